"""The static-cache fast path (``cospec.fast``) gives the same results as ``CachedLM``.

On CPU it runs eagerly (no CUDA graphs), so these tests check its arithmetic and its cache
bookkeeping: position-indexed slots, O(1) rollback, stale slots never seen, a full cache.
"""

import gc

import pytest
import torch
from fake_graphs import fake_compiled
from tiny import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from cospec import fast
from cospec.acceptance import ExactRule
from cospec.arbiter import ArbiterRule, ConfidencePolicy
from cospec.cos import Combination, cos_generate
from cospec.decoding import CachedLM, cached_lm, generate
from cospec.errors import CospecError
from cospec.fast import Engine, StaticLM
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats


def prompt(seed: int, n: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 96, (n,), generator=g).tolist()


@pytest.fixture
def static(monkeypatch):
    """Run the loops with StaticLM (as on CUDA); ``eager()`` switches back to CachedLM."""
    monkeypatch.setenv("COSPEC_STATIC", "1")

    def eager():
        monkeypatch.setenv("COSPEC_EAGER", "1")

    def on():
        monkeypatch.delenv("COSPEC_EAGER", raising=False)

    return eager, on


def both(static, fn):
    """fn() under StaticLM and under CachedLM."""
    eager, on = static
    on()
    got = fn()
    eager()
    want = fn()
    on()
    return got, want


def test_static_lm_is_chosen(target, static):
    assert isinstance(cached_lm(target), StaticLM)
    static[0]()
    assert isinstance(cached_lm(target), CachedLM)


def test_logits_and_hidden_match_the_model(target):
    ids = prompt(0, 32)
    a, b = StaticLM(target, hidden=True, max_len=64), CachedLM(target, hidden=True)
    # the last chunk keeps 20 rows: the final norm over more than 16, as wide batch steps
    for chunk, keep in ((ids[:7], 3), (ids[7:8], 1), (ids[8:12], 4), (ids[12:], 20)):
        got, want = a.forward(chunk, keep), b.forward(chunk, keep)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        assert got[0].dtype == torch.float32 and a.length == b.length


def test_rollback_hides_stale_slots(target):
    """Rejected tokens stay in their slots after crop; the next forward must not see them."""
    ids = prompt(1, 12)
    lm = StaticLM(target, max_len=64)
    lm.forward(ids + prompt(9, 20), keep=1)   # 20 tokens that will be rolled back
    lm.crop(7)
    assert lm.length == 7
    got, _ = lm.forward(ids[7:10], keep=3)
    want, _ = CachedLM(target).forward(ids[:10], keep=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_full_cache_and_overflow(target):
    ids = prompt(2, 16)
    eng = Engine(target, max_len=16)
    eng.run(ids[:15], 0)
    logits, _ = eng.run(ids[15:], 15)  # the last slot
    want, _ = CachedLM(target).forward(ids, keep=1)
    torch.testing.assert_close(logits[-1:].float(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(CospecError, match="full"):
        eng.run(ids[:2], 15)


def test_engines_are_pooled_and_never_shared(target):
    a = StaticLM(target, max_len=100)
    b = StaticLM(target, max_len=100)
    assert a.engine is not b.engine  # draft = target: two caches of one model
    eng = a.engine
    del a
    gc.collect()
    c = StaticLM(target, max_len=200)  # reuses the released engine
    assert c.engine is eng and eng.max_len % fast.LEN_ROUND == 0
    del b, c


def test_an_engine_made_before_int8_weights_is_not_reused(monkeypatch):
    """``int8_weights`` asked for after a model's engines were made: the engine released
    back to the pool is not handed out again (it would read the model's own weights, as a
    draft whose int8 copies were asked for mid-process once did, unseen, in a speed run);
    the next one is made anew, and is then pooled as any other."""
    model = tiny_model(12, dtype=torch.float32)
    a = StaticLM(model, max_len=64)
    old = a.engine
    assert not old.int8_asked
    del a
    gc.collect()
    with pytest.warns(UserWarning, match="fused layers only"):  # CPU: no fused layers
        fast.int8_weights(model)
        b = StaticLM(model, max_len=64)
    assert b.engine is not old and b.engine.int8_asked
    new = b.engine
    del b
    gc.collect()
    assert StaticLM(model, max_len=64).engine is new


@pytest.mark.parametrize("k", [1, 3, 5])
def test_generate_greedy_same_tokens(target, draft, static, k):
    ids = prompt(k)
    for proposer in (None, draft, target):
        got, want = both(static, lambda p=proposer: [
            t.id for t in generate(target, p, ids, ExactRule(), k=k, max_new_tokens=40)])
        assert got == want and len(got) == 40


def test_generate_sampling_same_draws(target, draft, static):
    ids = prompt(7)
    cfg = SamplingConfig(temperature=1.0)

    def run():
        stats = DecodeStats()
        toks = [t.id for t in generate(target, draft, ids, ExactRule(), k=4, max_new_tokens=48,
                                       sampling=cfg, seed=3, stats=stats)]
        return toks, stats.accepted, stats.steps

    got, want = both(static, run)
    assert got == want and got[2] > 12  # rejections (rollbacks) happened


def test_arbiter_with_lookahead_same_tokens(target, draft, static):
    rule = ArbiterRule(ConfidencePolicy(0.2))
    ids = prompt(8)
    got, want = both(static, lambda: [(t.id, t.from_draft) for t in generate(
        target, draft, ids, rule, k=3, max_new_tokens=30)])
    assert got == want and any(d for _, d in got)  # some draft tokens kept over the target


@pytest.mark.parametrize("method", ["we", "cos-we", "cd-sd"])
def test_cos_same_tokens(target, draft, static, method):
    combo = Combination("we", (0.5, 0.5)) if "we" in method else Combination("cd", mu=0.1)
    ids = prompt(10)
    got, want = both(static, lambda: [t.id for t in cos_generate(
        [draft, target], ids, combo, method, gamma=4, max_new_tokens=30)])
    assert got == want


def test_llama_family(static):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      initializer_range=0.3, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).double().eval()
    assert fast.supported(model)
    ids = prompt(11)
    got, want = both(static, lambda: [t.id for t in generate(
        model, None, ids, ExactRule(), k=1, max_new_tokens=20)])
    assert got == want


@pytest.mark.parametrize("flag", ["compiled", None, "eager", "graphs"])
def test_compiled_prefill_is_opt_in(static, flag, monkeypatch):
    """In the batch-1 engine COSPEC_PREFILL=compiled (and only that: unset, eager or graphs
    is eager here) sends inputs of more than MAX_GRAPH tokens (prefill) through the engine's
    compiled halves, stood in for by recording wrappers of the reference ones; shorter ones
    stay as they were (eager on CPU) and the greedy tokens stay CachedLM's."""
    seen = fake_compiled(monkeypatch, fast)
    if flag is None:
        monkeypatch.delenv("COSPEC_PREFILL", raising=False)
    else:
        monkeypatch.setenv("COSPEC_PREFILL", flag)
    target, draft = tiny_model(21, dtype=torch.float32), tiny_model(22, layers=1,
                                                                   dtype=torch.float32)
    ids = prompt(7, n=fast.MAX_GRAPH + 9)
    got, want = both(static, lambda: [
        t.id for t in generate(target, draft, ids, ExactRule(), k=3, max_new_tokens=12)])
    assert got == want and len(got) == 12
    if flag == "compiled":  # one prefill of ids[:-1] a model, 2 halves a layer, and nothing else
        layers = len(target.model.layers) + len(draft.model.layers)
        assert [s[0] for s in seen] == [len(ids) - 1] * 2 * layers
    else:
        assert seen == []


@pytest.mark.parametrize("start", [0, 5])
def test_padded_fill_gives_the_forwards_cache(target, monkeypatch, start):
    """COSPEC_PREFILL=all-graphs' fill pads the ids to a multiple of PREFILL_BUCKET and runs
    the layers over them (eagerly here; from a graph a padded length on a GPU): the filled
    slots hold ``run``'s K/V, the pad rows' K/V land beyond them, and the next step's logits
    are ``run``'s."""
    monkeypatch.setattr(fast, "PREFILL_BUCKET", 8)
    ids = prompt(4, 40)
    n = 19                                                       # padded to 24
    a, b = Engine(target, max_len=64), Engine(target, max_len=64)
    a.prefill_graphs = True  # as under all-graphs on a GPU: fill takes the padded path
    calls = []
    padded_fill = a._fill_padded
    monkeypatch.setattr(a, "_fill_padded", lambda *args: calls.append(args[1:]) or
                        padded_fill(*args))
    for eng in (a, b):
        if start:
            eng.fill(ids[:start], 0)                             # <= MAX_GRAPH: run's
    a.fill(ids[start:start + n], start)
    b.run(ids[start:start + n], start)
    assert calls == [(start, 24)]
    end = start + n
    for ka, kb in zip(a.kc + a.vc, b.kc + b.vc):
        torch.testing.assert_close(ka[:, :end], kb[:, :end], rtol=1e-5, atol=1e-6)
        assert kb[:, end:].abs().sum() == 0
    # the pad rows (id 0, whose embedding may be 0) wrote past the real ones, from layer 1 on
    assert sum(float(k[:, end:start + 24].abs().sum()) for k in a.kc[1:] + a.vc[1:]) > 0
    got, want = a.run(ids[end:end + 3], end)[0], b.run(ids[end:end + 3], end)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class FakeFill:
    """A fill graph's contract on the CPU: the capture's warm-up runs the layers once on the
    staged ids and start (K/V written), and ``replay`` reruns them on whatever is staged."""

    def __init__(self, eng: Engine, length: int):
        self.eng, self.length = eng, length
        self.replay()

    def replay(self) -> None:
        self.eng._layers(self.eng.fill_ids[:self.length], self.eng.fill_start, eager=True)


@pytest.mark.parametrize("start", [0, 5])
def test_a_fill_from_slot_0_captures_every_padded_length(target, monkeypatch, start):
    """A padded fill from slot 0 captures the graph of every padded length the cache holds
    (their warm-ups write past the fill, where nothing is live); from a later slot, its own
    length only. Either way the filled slots hold ``run``'s K/V and the next step's logits
    are ``run``'s."""
    monkeypatch.setattr(fast, "PREFILL_BUCKET", 8)
    monkeypatch.setattr(fast, "PREFILL_GRAPH_MAX", 40)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t)   # no CUDA host memory here
    ids = prompt(6, 60)
    a, b = Engine(target, max_len=64), Engine(target, max_len=64)
    if start:
        a.run(ids[:start], 0)
        b.run(ids[:start], 0)
    a.prefill_graphs = a.use_graphs = True
    monkeypatch.setattr(a, "_capture_fill", lambda length: FakeFill(a, length))
    end = start + 19                                             # padded to 24
    a.fill(ids[start:end], start)
    b.run(ids[start:end], start)
    assert sorted(a.fills) == ([24] if start else [8, 16, 24, 32, 40])
    for ka, kb in zip(a.kc + a.vc, b.kc + b.vc):
        torch.testing.assert_close(ka[:, :end], kb[:, :end], rtol=1e-5, atol=1e-6)
    a.use_graphs = False                                         # the next step: run's, eager
    got, want = a.run(ids[end:end + 3], end)[0], b.run(ids[end:end + 3], end)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_graphs_give_the_same_tokens_on_the_gpu(static, monkeypatch):
    """COSPEC_PREFILL=all-graphs on a GPU: prompts of 25 and 70 tokens prefill through the
    padded graphs (captured once a padded length) and spd's greedy tokens stay CachedLM's."""
    monkeypatch.setenv("COSPEC_PREFILL", "all-graphs")
    target = tiny_model(21, dtype=torch.float32).cuda()
    draft = tiny_model(22, layers=1, dtype=torch.float32).cuda()
    for n in (fast.MAX_GRAPH + 9, 70):
        ids = prompt(n, n=n)
        got, want = both(static, lambda ids=ids: [t.id for t in generate(
            target, draft, ids, ExactRule(), k=3, max_new_tokens=12)])
        assert got == want and len(got) == 12
    gc.collect()
    lengths = range(fast.PREFILL_BUCKET, fast.PREFILL_GRAPH_MAX + 1, fast.PREFILL_BUCKET)
    assert all(sorted(e.fills) == [p for p in lengths if p <= e.max_len]
               for e in fast.engines(target))


def test_fill_takes_the_padded_graphs_only_where_they_fit(target, monkeypatch):
    """fill runs ``run``'s forward for at most MAX_GRAPH tokens, beyond PREFILL_GRAPH_MAX
    padded, where the padding would pass the cache, and unless all-graphs is on a GPU (on
    the CPU it never is)."""
    monkeypatch.setenv("COSPEC_PREFILL", "all-graphs")
    eng = Engine(target, max_len=64)
    assert not eng.prefill_graphs                                # no graphs on the CPU
    eng.prefill_graphs = True
    monkeypatch.setattr(fast, "PREFILL_GRAPH_MAX", 32)
    padded, ran = [], []
    monkeypatch.setattr(eng, "_fill_padded", lambda ids, start, p: padded.append((start, p)))
    monkeypatch.setattr(eng, "run", lambda ids, start: ran.append((start, len(ids))))
    ids = prompt(5, 60)
    eng.fill(ids[:fast.MAX_GRAPH], 0)                           # short: a step
    eng.fill(ids[:17], 0)                                       # padded to 64 > 32: eager
    monkeypatch.setattr(fast, "PREFILL_GRAPH_MAX", 64)
    eng.fill(ids[:17], 0)                                       # padded to 64: the graph
    eng.fill(ids[:17], 10)                                      # 10 + 64 > 64 slots: eager
    assert padded == [(0, 64)]
    assert ran == [(0, fast.MAX_GRAPH), (0, 17), (10, 17)]


def test_unsupported_falls_back(target, monkeypatch):
    monkeypatch.setenv("COSPEC_STATIC", "1")
    target.config.hidden_act = "gelu"
    try:
        assert not fast.supported(target)
        assert isinstance(cached_lm(target), CachedLM)
    finally:
        target.config.hidden_act = "silu"
    assert fast.wanted(tiny_model(5)) is True


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])
def test_steps_and_rollbacks_match_the_eager_cache(device):
    """StaticLM gives CachedLM's logits (float32) through 1-token steps, multi-token
    verifies and rollbacks; on a GPU through captured, compiled CUDA graphs."""
    model = tiny_model(1).to(device, torch.float32)
    ids = prompt(3, 40)
    fast_lm, ref = StaticLM(model, max_len=64), CachedLM(model)
    steps = 0
    with torch.inference_mode():
        for a, b in fast.side_by_side(fast_lm, ref, ids, start=20, steps=8, verify=4, reject=2,
                                      every=2):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            steps += 1
    assert steps == 8 and fast_lm.length == ref.length == 20 + 4 * 2 + 4 * 1
    assert bool(fast_lm.engine.graphs) == (device == "cuda")  # graphs exactly on the GPU


def test_fused_weights_are_the_models_own():
    """The engine's stacked q/k/v (and gate/up) weights share the model's memory: the model's
    parameters keep their values and become slices of one buffer; fusing twice is a no-op."""
    model = tiny_model(seed=3)
    attn = model.model.layers[0].self_attn
    before = [p.detach().clone() for p in (attn.q_proj.weight, attn.k_proj.weight,
                                           attn.v_proj.weight)]
    w, _ = fast.fused([attn.q_proj, attn.k_proj, attn.v_proj])
    assert w.shape[0] == sum(b.shape[0] for b in before)
    for p, b in zip((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), before):
        assert torch.equal(p, b)
        assert p.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert fast.fused([attn.q_proj, attn.k_proj, attn.v_proj])[0] is w
    w.zero_()  # one buffer: writing it writes the model's weights
    assert float(attn.k_proj.weight.detach().abs().sum()) == 0.0
