"""Tensor parallelism (``cospec.tp``) on the CPU: 2 gloo ranks give the single process's results.

The ranks are two spawned processes that stay up for the module (``ranks``); a test sends
them a function of this module to run (both run it, each on its own rank) and gets back
each rank's result. The tiny models are built from a seed, so every rank and the test
process hold the same weights.
"""

from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from tiny import save_tiny, tiny_model

from cospec import tp
from cospec.acceptance import ExactRule
from cospec.cos import Combination, cos_generate
from cospec.decoding import CachedLM, generate
from cospec.errors import CospecError
from cospec.fast import StaticLM

WORLD = 2
WAIT_S = 120  # a test's call that gets no answer in this time fails (never a hang)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int, timeout_s: float) -> None:
    """What torchrun does for a rank, then ``tp.init``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert tp.init(WORLD, "cpu", timeout_s) == "cpu"


def _serve(rank: int, port: int, inbox, outbox) -> None:
    """A rank: run each (function, args) from ``inbox``, answer (rank, ok, result)."""
    _join(rank, port, 30.0)
    while (job := inbox.get()) is not None:
        fn, args = job
        try:
            outbox.put((rank, True, fn(*args)))
        except Exception:
            outbox.put((rank, False, traceback.format_exc()))
    tp.finish()


class Ranks:
    def __init__(self):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.inbox = [ctx.Queue() for _ in range(WORLD)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, port, self.inbox[r], self.outbox),
                                  daemon=True) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def call(self, fn, *args) -> list:
        """``fn(*args)`` on every rank; their results, by rank."""
        for q in self.inbox:
            q.put((fn, args))
        out = [None] * WORLD
        for _ in range(WORLD):
            rank, ok, result = self.outbox.get(timeout=WAIT_S)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{result}")
            out[rank] = result
        return out

    def close(self):
        for q in self.inbox:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def ranks():
    r = Ranks()
    yield r
    r.close()


def prompt(seed: int, n: int = 6, vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


SCHEDULE = dict(start=9, steps=6, verify=4, reject=2, every=2)  # steps, verifies, rollbacks


def _steps(lm, ref, ids: list[int]) -> list[torch.Tensor]:
    """Logits [n, V] of ``lm`` through SCHEDULE (``ref`` driven alongside)."""
    from cospec import fast

    with torch.inference_mode():
        return [a for a, _ in fast.side_by_side(lm, ref, ids, **SCHEDULE)]


def sharded_steps(vocab: int) -> list[torch.Tensor]:
    """On a rank: logits of the fp32 target's shard through SCHEDULE (prefill, 1-token steps,
    4-token verifies, 2 of them rolled back)."""
    target = tp.wrap_target(tiny_model(1, vocab=vocab, dtype=torch.float32))
    lm = StaticLM(target, max_len=64)
    return _steps(lm, CachedLM(tiny_model(2, layers=1, vocab=vocab)), prompt(3, 30, vocab))


@pytest.mark.parametrize("vocab", [96, 97])  # 97: the last rank's vocabulary rows padded
def test_sharded_logits_equal_single_process(ranks, vocab):
    got = ranks.call(sharded_steps, vocab)
    model = tiny_model(1, vocab=vocab, dtype=torch.float32)
    want = _steps(CachedLM(model), CachedLM(tiny_model(2, layers=1, vocab=vocab)),
                  prompt(3, 30, vocab))
    assert len(want) == SCHEDULE["steps"]
    for rank in range(WORLD):
        for a, b in zip(got[rank], want):
            assert a.shape == b.shape and a.shape[-1] == vocab
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got[0], got[1]):  # every rank sees the same logits, bit for bit
        assert torch.equal(a, b)


def shard_layout() -> dict:
    """On a rank: what its shard holds."""
    target = tp.wrap_target(tiny_model(1, dtype=torch.float32))
    from cospec.fast import acquire

    eng = acquire(target, 64)
    return {"heads": eng.heads, "kv_heads": eng.kv_heads, "cache": tuple(eng.kc[0].shape),
            "embed": tuple(eng.embed.shape), "qkv": tuple(eng.layers[0][1].shape),
            "down": tuple(eng.layers[0][9].shape),
            "numel": sum(p.numel() for p in target.parameters())}


def test_each_rank_holds_half(ranks):
    """Heads, KV cache, MLP columns and vocabulary rows split in two; only norms repeat."""
    got = ranks.call(shard_layout)
    model = tiny_model(1, dtype=torch.float32)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    for g in got:
        assert g["heads"] == 2 and g["kv_heads"] == 1 and g["cache"][0] == 1
        assert g["embed"] == (48, 32) and g["qkv"] == (32, 32) and g["down"] == (32, 32)
        assert g["numel"] == (model.num_parameters() - norms) // 2 + norms


def sharded_decode(method: str, k: int, seed: int) -> list[int]:
    """On a rank: the tokens of ``method`` with the float64 target sharded, draft whole."""
    target = tp.wrap_target(tiny_model(1))
    return _decode(target, tiny_model(2, layers=1), method, k, seed)


def _decode(target, draft, method: str, k: int, seed: int) -> list[int]:
    ids = prompt(seed)
    if method == "target":
        toks = generate(target, None, ids, ExactRule(), max_new_tokens=40)
    elif method == "spd":
        toks = generate(target, draft, ids, ExactRule(), k=k, max_new_tokens=40)
    elif method == "spd-self":  # draft = target's own weights: everything accepted
        toks = generate(target, tiny_model(1), ids, ExactRule(), k=k, max_new_tokens=40)
    else:
        toks = cos_generate([draft, target], ids, Combination("we", (0.5, 0.5)), method,
                            gamma=k, max_new_tokens=30)
    return [t.id for t in toks]


@pytest.mark.parametrize("method,k", [("target", 1), ("spd", 3), ("spd-self", 4),
                                      ("cos-we", 3)])
def test_greedy_outputs_identical(ranks, method, k):
    got = ranks.call(sharded_decode, method, k, k)
    want = _decode(tiny_model(1), tiny_model(2, layers=1), method, k, k)
    assert got[0] == want and got[1] == want and len(want) >= 30


def rollback_state(seed: int) -> dict:
    """On a rank: spd with rejections; the target cache length and its rows after the run,
    and a forward after a crop compared with a fresh cache fed the same prefix."""
    target = tp.wrap_target(tiny_model(1))
    ids = prompt(seed, 12)
    lm = StaticLM(target, max_len=64)
    with torch.inference_mode():
        lm.forward(ids[:8] + prompt(seed + 50, 5), keep=1)   # 5 drafts, all rejected
        lm.crop(8)
        after = lm.forward(ids[8:12], keep=4)[0]
        fresh = StaticLM(target, max_len=64)
        clean = fresh.forward(ids, keep=4)[0]
    return {"length": lm.length, "after": after, "clean": clean,
            "kv": [lm.engine.kc[0][:, :12].clone(), lm.engine.vc[0][:, :12].clone()]}


def test_rollback_consistent_on_every_rank(ranks):
    """After a crop, every rank's cache is at the same length and a forward sees none of the
    rejected tokens: the same logits as a cache that never saw them, on each rank."""
    got = ranks.call(rollback_state, 5)
    for g in got:
        assert g["length"] == 12
        torch.testing.assert_close(g["after"], g["clean"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[0]["after"], got[1]["after"], rtol=0, atol=0)
    # each rank's cache rows are its own kv head: different on the two ranks
    assert not torch.equal(got[0]["kv"][0], got[1]["kv"][0])


def loaded_steps(folder: str) -> tuple[list[torch.Tensor], int]:
    """On a rank: logits of the shard read from ``folder``'s safetensors slices."""
    target, _ = tp.load_target(folder, "cpu", torch.float32)
    lm = StaticLM(target, max_len=64)
    vocab = target.config.vocab_size
    ids = prompt(4, 30, vocab)
    return _steps(lm, CachedLM(tiny_model(2, layers=1, vocab=vocab)), ids), sum(
        p.numel() for p in target.parameters())


def test_loader_reads_only_its_slices(ranks, tmp_path):
    """The shard read from a checkpoint split over several safetensors files gives the
    single-process logits, and holds half the weights (norms aside)."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path / "target", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path / "split", max_shard_size="40KB")
    assert (tmp_path / "split" / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "split" / name).write_bytes((folder / name).read_bytes())
    got = ranks.call(loaded_steps, str(tmp_path / "split"))
    vocab = model.config.vocab_size
    want = _steps(CachedLM(model), CachedLM(tiny_model(2, layers=1, vocab=vocab)),
                  prompt(4, 30, vocab))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    for steps, numel in got:
        assert numel == (model.num_parameters() - norms) // 2 + norms
        for a, b in zip(steps, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _die_or_wait(rank: int, port: int, outbox, how: str) -> None:
    """Rank 1 dies (or hangs) after the first step; rank 0 must get an error, not hang."""
    _join(rank, port, 4.0)
    target = tp.wrap_target(tiny_model(1))
    lm = StaticLM(target, max_len=64)
    with torch.inference_mode():
        lm.forward(prompt(0), keep=1)
        if rank == 1:
            if how == "dies":
                os._exit(3)
            time.sleep(60)
        t0 = time.perf_counter()
        try:
            lm.forward(prompt(1, 1), keep=1)
            outbox.put(("no error", time.perf_counter() - t0))
        except CospecError as err:
            outbox.put((str(err), time.perf_counter() - t0))
        except Exception as err:  # noqa: BLE001 - the test reports what came instead
            outbox.put((f"not a CospecError: {type(err).__name__}: {err}", -1.0))
    outbox.close()
    outbox.join_thread()  # flushed before the hard exit
    os._exit(0)


@pytest.mark.parametrize("how", ["dies", pytest.param("hangs", marks=pytest.mark.slow)])
def test_a_lost_rank_ends_with_an_error(how):
    ctx = mp.get_context("spawn")
    port, outbox = _free_port(), ctx.Queue()
    procs = [ctx.Process(target=_die_or_wait, args=(r, port, outbox, how), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        message, seconds = outbox.get(timeout=WAIT_S)
    finally:
        for p in procs:
            p.kill()
    assert "collective failed" in message, message
    assert 0 <= seconds < 4.0 + 3.0


def test_init_refuses_a_wrong_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(CospecError, match="torchrun --nproc-per-node 2"):
        tp.init(2)


def bench_tiny() -> dict:
    """On a rank: ``python -m cospec.tp``'s measurement on a tiny random shape."""
    from argparse import Namespace

    tp.SHAPES["tiny"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    args = Namespace(tp=WORLD, shape="tiny", dtype="float32", prefix=10, tokens=[1, 3],
                     warmup=0, reps=2, bandwidth=1e9, eager=True)
    return tp._bench(args)


def test_step_timing_and_roofline(ranks):
    """The GPU measurement runs on CPU ranks: a time per forward length, and a roofline from
    the bytes a rank reads: half the weights but the input embedding (norms whole), and half
    the K/V cache."""
    import json

    got = ranks.call(bench_tiny)
    model = tiny_model(0, dtype=torch.float32)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    weights = model.num_parameters() - model.model.embed_tokens.weight.numel() - norms
    kv = 2 * 2 * 1 * 8 * 10  # layers, K and V, kv heads per rank, head dim, cached tokens
    for g in got:
        json.dumps(g)
        assert g["bytes_per_rank_step"] == 4 * (weights // 2 + norms + kv)
        assert g["roofline_s"] == g["bytes_per_rank_step"] / 1e9
        assert set(g["steps"]) == {"1", "3"} and all(
            s["median_s"] > 0 and s["reps"] == 2 for s in g["steps"].values())


def test_cli_tp_generate_equals_one_process_and_prints_once(tiny_dirs):
    """``torchrun --nproc-per-node 2 -m cospec generate --tp 2``: rank 0 alone prints, and its
    greedy spd tokens equal the single-process run's."""
    import json
    import subprocess
    import sys

    t, d = tiny_dirs
    args = ["generate", "--target", str(t), "--draft", str(d), "--method", "spd", "--prompt",
            "w5 w9", "--no-chat", "--max-new-tokens", "12", "--json", "--device", "cpu",
            "--dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "cospec", *args], capture_output=True,
                         text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "cospec", *args, "--tp", "2"], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout)["token_ids"] == json.loads(one.stdout)["token_ids"]


def padded_sampled(target: str, draft: str) -> tuple[int, int, list[int]]:
    """On a rank: the pair of folders padded to different output widths, loaded sharded,
    and sampled spd on it (rows compared row for row: one width, or a shape error)."""
    from cospec.methods import build_method
    from cospec.sampling import SamplingConfig

    pair = tp.load_pair(target, draft, "cpu", torch.float32)
    hot = SamplingConfig(temperature=1.0)
    ids, _, _ = build_method("spd", pair, sampling=hot).run(
        [5, 17, 33], k=3, max_new_tokens=10, sampling=hot, eos_ids=(), seed=3)
    return pair.target.vocab, pair.draft.get_output_embeddings().weight.shape[0], ids


def test_a_pair_padded_differently_decodes_sharded(ranks, tmp_path):
    """As ``models.load_pair`` (tests/test_pair_limits.py), the sharded target of a pair
    whose output layers are padded to different widths scores the rows the draft does."""
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    for name, seed, pad in (("target", 1, 8), ("draft", 2, 2)):
        tiny_model(seed, vocab=len(tok) + pad, dtype=torch.float32).save_pretrained(
            tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    got = ranks.call(padded_sampled, str(tmp_path / "target"), str(tmp_path / "draft"))
    assert got[0] == got[1]  # the ranks agree
    target_rows, draft_rows, ids = got[0]
    assert target_rows == draft_rows == len(tok) + 2 and len(ids) == 10
