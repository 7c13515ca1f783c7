"""GPU speed figures: cospec's fast path against transformers on one machine.

    PYTHONPATH=. python scripts/gpu_speed.py --out DIR [--parts target,pair,replay]
        [--random] [--prompts 10] [--new 256] [--k 5]

Parts (each writes its entry of DIR/gpu_speed.json as soon as it is done; a part already
there is skipped, so a rerun resumes):

- ``target``: target-only decoding, batch 1, bf16, 128-token prompt, ``--new`` tokens, for the
  Qwen2.5 0.5B / 1.5B / 7B shapes (real weights for 0.5B/1.5B unless ``--random``; 7B always
  random, none ships): cospec (static cache + CUDA graphs) vs ``transformers.generate`` eager
  and with ``cache_implementation="static"`` (compiled); tokens/s end to end (prefill
  included, warm-up and compilation excluded and reported apart) and as a fraction of the
  memory-bandwidth roofline (bytes of weights read per token / HBM bandwidth).
- ``pair`` (or ``pair:TASK:T``, e.g. ``pair:humaneval:1``): the real pair on GSM8K heldout
  (or HumanEval / MBPP test) prompts, chat template, methods interleaved per prompt: target,
  spd, cospec and the heuristics confidence / entropy (T = 0 only), the CoS methods (cos-we,
  we-sd, we, cos-cd, cd-sd, cd), and with ``--hf`` at T = 0 transformers' eager ``generate``
  and assisted generation (same k, constant schedule); ``--methods`` keeps a subset.
  Records spd's and cospec's accepted-length traces.
- ``replay``: Qwen2.5-7B shapes (random weights) verifying the 0.5B draft, the acceptance
  decisions replayed from the ``pair`` traces (``cospec.replay``): every forward has the
  shape it had with the real pair. Labelled *replayed*. spd and cospec against target-only;
  CoS (we-sd, cos-we, when the ``pair`` part recorded them) against ``we`` with the 7B.
  The 7B is given the draft's vocabulary (151,936 rows, not 152,064) so that the two
  models' distributions can be combined.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from cospec import decoding, fast, fast_block, fused
from cospec.acceptance import ExactRule
from cospec.cos import Combination, cos_generate
from cospec.decoding import generate, warm_up_budgets
from cospec.errors import CospecError
from cospec.lookup import lookup_generate
from cospec.methods import MethodOptions, build_method, encode_prompt, eos_ids
from cospec.replay import CosTrace, Recording, ReplayRule
from cospec.report import in_turn
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats

PAIR = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
# Qwen2.5 shapes (config.json of the released models)
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
}
REAL = {"0.5b": PAIR[1], "1.5b": PAIR[0]}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s (SXM)


def sync() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def random_model(size: str, vocab: int | None = None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = SHAPES[size] | ({"vocab_size": vocab} if vocab else {})
    cfg = Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      use_sliding_window=False, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def get_model(size: str, random: bool):
    if size in REAL and not random:
        from cospec.models import load_model

        return load_model(REAL[size], "cuda", torch.bfloat16)[0], "real"
    return random_model(size), "random"


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every parameter once, but an untied input
    embedding only by the row it looks up."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def bandwidth() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in BANDWIDTH.items() if k in name), 3.35e12)


def ours(model, draft, prompt, rule, n, k=5, stats=None) -> tuple[list[int], float]:
    """(tokens, end-to-end seconds) of our loop, no EOS."""
    t0 = sync()
    ids = [t.id for t in generate(model, draft, prompt, rule, k=k, max_new_tokens=n,
                                  stats=stats)]
    return ids, sync() - t0


# target-only's loop otherwise chunked: (tokens a host read, chunks launched ahead of it)
# (``decoding.RUN_AHEAD``, ``decoding.QUEUED``). target-wait: as it was before its chunks
# were queued (each read before the next launches); target-chunk2: chunks of 2, fewer
# tokens decoded past an EOS (at most 3 against 7)
TARGET_CHUNKS = {"target-wait": (8, 0), "target-chunk2": (2, 1)}


@contextlib.contextmanager
def chunked(run_ahead: int, queued: int):
    """Target-only decoding with chunks of ``run_ahead`` tokens, ``queued`` launched ahead."""
    saved = decoding.RUN_AHEAD, decoding.QUEUED
    decoding.RUN_AHEAD, decoding.QUEUED = run_ahead, queued
    try:
        yield
    finally:
        decoding.RUN_AHEAD, decoding.QUEUED = saved


def hf(model, prompt, n, eos: list[int] | None = None, **kw) -> tuple[list[int], float]:
    """transformers' generate, greedy: exactly n tokens, or up to n stopping at ``eos``."""
    x = torch.tensor([prompt], device="cuda")
    length = dict(eos_token_id=eos) if eos else dict(min_new_tokens=n)
    t0 = sync()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n, pad_token_id=0, **length, **kw)
    return out[0, len(prompt):].tolist(), sync() - t0


def capture_s(*models) -> float:
    return sum(e.capture_s for m in models for e in fast.engines(m))


def part_target(args) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 100000, (128,), generator=g).tolist()
    n, reps, out = args.new, args.reps, {}
    for size in SHAPES:
        model, weights = get_model(size, args.random)
        row = {"weights": weights, "bytes_per_token": bytes_per_token(model)}
        row["roofline_tok_s"] = bandwidth() / row["bytes_per_token"]
        t0 = time.perf_counter()
        ours(model, None, prompt, ExactRule(), n)
        row["ours_warmup_s"] = time.perf_counter() - t0
        row["ours_capture_s"] = capture_s(model)
        times = [ours(model, None, prompt, ExactRule(), n)[1] for _ in range(reps)]
        row["ours_tok_s"] = n / statistics.median(times)
        s = DecodeStats()
        ids_ours, _ = ours(model, None, prompt, ExactRule(), n, stats=s)
        row["ours_decode_tok_s"] = s.tokens_per_s
        hf(model, prompt, 8)
        times = [hf(model, prompt, n)[1] for _ in range(max(1, reps - 1))]
        row["hf_eager_tok_s"] = n / statistics.median(times)
        ids_eager = hf(model, prompt, n)[0]
        t0 = time.perf_counter()
        hf(model, prompt, n, cache_implementation="static")
        row["hf_static_warmup_s"] = time.perf_counter() - t0
        hf(model, prompt, n, cache_implementation="static")
        times = [hf(model, prompt, n, cache_implementation="static")[1] for _ in range(reps)]
        row["hf_static_tok_s"] = n / statistics.median(times)
        row["same_tokens_as_hf_eager"] = sum(a == b for a, b in zip(ids_ours, ids_eager))
        for key in ("ours", "hf_eager", "hf_static"):
            row[f"{key}_roofline"] = row[f"{key}_tok_s"] / row["roofline_tok_s"]
        row["ours_vs_hf_eager"] = row["ours_tok_s"] / row["hf_eager_tok_s"]
        row["ours_vs_hf_static"] = row["ours_tok_s"] / row["hf_static_tok_s"]
        out[size] = row
        print(size, json.dumps(row), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def part_check(args) -> dict:
    """The fast path against transformers' own forward on the GPU (0.5B shapes, random
    weights): logits of a prefill, 1-token steps, 6-token verifies and a rollback; float32
    and bfloat16."""
    from cospec.decoding import CachedLM

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model("0.5b").to(dtype)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 100000, (200,), generator=g).tolist()
        fast_lm, ref = fast.StaticLM(model, max_len=512), CachedLM(model)
        worst, agree, rows = 0.0, 0, 0
        with torch.inference_mode():
            for a, b in fast.side_by_side(fast_lm, ref, ids, start=100, steps=30, verify=6,
                                          reject=4, every=3):
                worst = max(worst, float((a - b).abs().max()))
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                rows += a.shape[0]
        name = str(dtype).split(".")[-1]
        out[name] = {"max_abs_logit_diff": worst, "argmax_agree": agree, "rows": rows}
        g2 = torch.Generator().manual_seed(2)
        prompt = torch.randint(1000, 100000, (64,), generator=g2).tolist()
        a = ours(model, None, prompt, ExactRule(), 64)[0]
        os.environ["COSPEC_EAGER"] = "1"
        b = ours(model, None, prompt, ExactRule(), 64)[0]
        del os.environ["COSPEC_EAGER"]
        out[name]["greedy_64_same_prefix"] = next(
            (i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(name, out[name], flush=True)
        del model, fast_lm
        gc.collect()
        torch.cuda.empty_cache()
    return out


def task_prompts(tok, task: str, count: int) -> list[list[int]]:
    from cospec.tasks import get_task

    problems = get_task(task).problems("heldout" if task == "gsm8k" else "test")[:count]
    return [encode_prompt(tok, p.prompt) for p in problems]


@functools.cache
def real_pair():
    """The real pair on the GPU, loaded once and shared by the pair parts of one process."""
    from cospec.models import load_pair

    return load_pair(*PAIR, device="cuda", dtype=torch.bfloat16)


BLOCK_METHODS = ("spd-graph", "spd-block", "spd-graph-int8", "spd-block-int8")
# the method, its draft's int8 copy (cospec and cos-we: in their host loops)
INT8_METHODS = ("spd-staged-int8", "spd-lookup-int8", "cospec-int8", "cos-we-int8")
HOST_METHODS = ("spd-staged-host", "spd-staged-host-int8")  # spd-staged in decoding's loop
# cospec and cos-we with each block on the device (device_blocks.ruled_block), -int8: that draft
RULED_METHODS = ("cospec-block", "cos-we-block", "cospec-block-int8", "cos-we-block-int8")


@functools.cache
def int8_draft():
    """A copy of the real pair's draft whose engines read int8 copies of its weights
    (``fast.int8_weights``), beside the bf16 draft in the same run."""
    draft = copy.deepcopy(real_pair().draft)
    fast.int8_weights(draft)
    return draft


def pair_part(part: str) -> tuple[str, float] | None:
    """(task, temperature) of a part named ``pair`` or ``pair:TASK:T``; None if it is not
    one of those."""
    fields = part.split(":")
    if fields == ["pair"]:
        return "gsm8k", 0.0
    if (len(fields) == 3 and fields[0] == "pair" and fields[1] in ("gsm8k", "humaneval", "mbpp")
            and fields[2].replace(".", "", 1).isdigit()):
        return fields[1], float(fields[2])
    return None


def part_pair(args, task: str = "gsm8k", temperature: float = 0.0) -> dict:
    """Part ``pair`` (GSM8K, T = 0) or ``pair:TASK:T``; transformers' baselines with --hf."""
    pair = real_pair()
    eos = eos_ids(pair.tokenizer, pair.target)
    prompts = task_prompts(pair.tokenizer, task, args.prompts)
    sampling = SamplingConfig(temperature=temperature)
    lossy = ["cospec", "confidence", "entropy"] if sampling.greedy else []
    names = ["target", "spd", "lookup", "spd-lookup", "spd-staged"] + lossy + [
        "cos-we", "we-sd", "we", "cos-cd", "cd-sd", "cd"]
    names += ["hf-assisted"] if args.hf and sampling.greedy else []
    if args.methods:
        names = [m for m in names if m in args.methods.split(",") or m == "target"]
    methods = {m: build_method(m, pair, MethodOptions(), sampling) for m in names}
    for block in BLOCK_METHODS:  # cospec.fast_block: steps, or one graph a block
        if block in args.methods.split(","):
            names.insert(names.index("target") + 1, block)
    for name in INT8_METHODS + HOST_METHODS + RULED_METHODS:
        if name in args.methods.split(","):
            if name.startswith("cospec") and not sampling.greedy:
                continue
            base = build_method("spd-staged" if "host" in name else
                                name.removesuffix("-int8").removesuffix("-block"),
                                pair, MethodOptions(), sampling)
            draft = int8_draft() if name.endswith("-int8") else pair.draft
            methods[name] = dataclasses.replace(
                base, proposer=draft, models=tuple(draft if m is pair.draft else m
                                                   for m in base.models))
            names.insert(names.index("target") + 1, name)
            if name.startswith("cospec"):
                lossy.append(name)  # its arbiter's figures beside cospec's
    for name in TARGET_CHUNKS:
        if name in args.methods.split(","):
            names.insert(names.index("target") + 1, name)
    if "cospec-host" in args.methods.split(",") and "cospec" in methods:
        # the arbiter's decisions on the host path (ArbiterRule.graphed off), for comparison
        methods["cospec-host"] = build_method("cospec", pair, MethodOptions(), sampling)
        methods["cospec-host"].rule.graphed = False
        names.insert(names.index("cospec") + 1, "cospec-host")
        lossy.insert(lossy.index("cospec") + 1, "cospec-host")
    k = args.k

    def run(name: str, prompt: list[int], seed: int, n: int = args.new) -> dict:
        stats, trace = DecodeStats(), None
        before = fast_block.captures()
        t0 = sync()
        if name == "hf-eager":
            ids = hf(pair.target, prompt, n, eos)[0]
        elif name in TARGET_CHUNKS:
            with chunked(*TARGET_CHUNKS[name]):
                ids, _, stats = methods["target"].run(prompt, k=k, max_new_tokens=n,
                                                      sampling=sampling, eos_ids=eos, seed=seed)
        elif name in BLOCK_METHODS:
            draft = int8_draft() if name.endswith("-int8") else pair.draft
            ids = [t.id for t in fast_block.stream(
                pair.target, draft, prompt, k=k, max_new_tokens=n, eos_ids=eos, stats=stats,
                graph=name.startswith("spd-graph"), sampling=sampling, seed=seed)]
        elif name in RULED_METHODS:  # the method's choice in fast_block's ruled block
            m = methods[name]  # (sampled cos-we: its own block)
            ids = [t.id for t in fast_block.stream(
                m.verifier, m.proposer, prompt, k=k, max_new_tokens=n, eos_ids=eos,
                stats=stats, choice=m.block_choice(), sampling=sampling, seed=seed)]
        elif name in HOST_METHODS:  # the host loop's staged drafting, never fast_block
            m = methods[name]
            ids = [t.id for t in lookup_generate(m.verifier, m.proposer, prompt, m.rule, k=k,
                                                 max_new_tokens=n, sampling=sampling,
                                                 eos_ids=eos, seed=seed, stats=stats,
                                                 staged=True)]
        elif name in ("spd", *lossy):
            m = methods[name]
            rec = Recording(m.rule)
            ids = [t.id for t in generate(m.verifier, m.proposer, prompt, rec, k=k,
                                          max_new_tokens=n, sampling=sampling, eos_ids=eos,
                                          seed=seed, stats=stats)]
            trace = rec.trace
        elif methods[name].combo is not None and name != methods[name].combo.kind:
            m, rec = methods[name], CosTrace()  # speculative CoS: keep its outcomes
            ids = [t.id for t in cos_generate(list(m.models), prompt, m.combo, m.name, gamma=k,
                                              max_new_tokens=n, sampling=sampling,
                                              eos_ids=eos, seed=seed, stats=stats,
                                              trace=rec)]
            trace = rec.outcomes
        else:
            ids, _, stats = methods[name].run(prompt, k=k, max_new_tokens=n,
                                              sampling=sampling, eos_ids=eos, seed=seed)
        total = sync() - t0
        return {"ids": ids, "total_s": total, "tok_s": len(ids) / total, "tau": stats.tau,
                "captured": fast_block.captures() != before,  # a graph captured in the timed window
                "arbiter_s": stats.arbiter_s, "arbiter_calls": stats.arbiter_calls,
                "overrides": stats.overrides, "steps": stats.steps,
                "decode_s": stats.decode_s, "prefill_s": stats.prefill_s, "trace": trace}

    order = names + (["hf-eager"] if "hf-assisted" in names else [])
    longest = max(prompts, key=len)  # the largest caches: their first fill from slot 0
    t0 = time.perf_counter()         # captures every padded prefill length (fast.Engine)

    def warm() -> None:  # graphs for every shape, compilation
        for name in list(order):
            try:
                run(name, longest, 0)
                for budget in warm_up_budgets(k):  # a last block of each draft length
                    run(name, prompts[0], 0, budget)
            except Exception as err:  # report the others rather than lose the part
                print(f"{name} failed, left out: {err!r}", flush=True)
                order.remove(name)

    fast_block.warm_until_settled(warm, rounds=3)
    warm = time.perf_counter() - t0
    gc.collect()  # what the warm-up left (engines let go, with their graphs) is freed now,
    sync()        # not inside a timed run
    rows = []
    for i, prompt in enumerate(prompts):
        row = {name: run(name, prompt, i) for name in in_turn(order, i)}
        rows.append({name: row[name] for name in order})
        print(i, {m: round(r["tok_s"], 1) for m, r in rows[-1].items()}, flush=True)
    out = {"task": task, "temperature": temperature, "prompts": len(prompts),
           "prompt_ids": prompts, "k": k, "max_new_tokens": args.new,
           "warmup_s": warm, "capture_s": capture_s(pair.target, pair.draft), "per_prompt": rows}
    summary = {}
    for name in order:
        toks = sum(len(r[name]["ids"]) for r in rows)
        secs = sum(r[name]["total_s"] for r in rows)
        summary[name] = {"tokens": toks, "seconds": secs, "tok_s": toks / secs}
    for name in order:
        summary[name]["vs_target"] = summary[name]["tok_s"] / summary["target"]["tok_s"]
    if "hf-assisted" in summary and "hf-eager" in summary:
        summary["spd_vs_hf_assisted"] = (summary["spd"]["tok_s"]
                                         / summary["hf-assisted"]["tok_s"])
        summary["hf_assisted_vs_hf_eager"] = (summary["hf-assisted"]["tok_s"]
                                              / summary["hf-eager"]["tok_s"])
    same = {"spd_identical_to_target": ("spd", "target"),
            "spd_block_identical_to_target": ("spd-block", "target"),
            "spd_graph_identical_to_target": ("spd-graph", "target"),
            "spd_graph_int8_identical_to_target": ("spd-graph-int8", "target"),
            "spd_block_int8_identical_to_target": ("spd-block-int8", "target"),
            "target_wait_identical_to_target": ("target-wait", "target"),
            "target_chunk2_identical_to_target": ("target-chunk2", "target"),
            "lookup_identical_to_target": ("lookup", "target"),
            "spd_lookup_identical_to_target": ("spd-lookup", "target"),
            "spd_staged_identical_to_target": ("spd-staged", "target"),
            "spd_staged_int8_identical_to_target": ("spd-staged-int8", "target"),
            "spd_staged_host_identical_to_target": ("spd-staged-host", "target"),
            "cospec_int8_identical_to_cospec": ("cospec-int8", "cospec"),
            "cospec_block_identical_to_cospec": ("cospec-block", "cospec"),
            "cospec_block_int8_identical_to_cospec_int8": ("cospec-block-int8", "cospec-int8"),
            "cos_we_block_identical_to_cos_we": ("cos-we-block", "cos-we"),
            "cos_we_block_int8_identical_to_cos_we_int8": ("cos-we-block-int8", "cos-we-int8"),
            "cos_we_int8_identical_to_cos_we": ("cos-we-int8", "cos-we"),
            "cos_we_identical_to_we": ("cos-we", "we"),
            "cos_cd_identical_to_cd": ("cos-cd", "cd")}
    for key, (a, b) in same.items():
        summary[key] = (sum(r[a]["ids"] == r[b]["ids"] for r in rows)
                        if a in order and b in order else None)
    for name in order:
        if rows[0][name]["steps"]:
            summary[name]["tau"] = statistics.mean(r[name]["tau"] for r in rows)
        if (ms := prefill_ms(rows, name)) is not None:
            summary[name]["prefill_ms"] = ms
    for base, exact in (("we", ("we-sd", "cos-we")), ("cd", ("cd-sd", "cos-cd"))):
        if not {base, *exact} <= set(order):
            continue
        for name in exact:
            summary[name][f"vs_{base}"] = summary[name]["tok_s"] / summary[base]["tok_s"]
        summary[exact[1]][f"vs_{exact[0]}"] = (summary[exact[1]]["tok_s"]
                                               / summary[exact[0]]["tok_s"])
    for name in (m for m in lossy if m in order):
        c = summary[name]
        c["arbiter_share"] = (sum(r[name]["arbiter_s"] for r in rows)
                              / sum(r[name]["decode_s"] for r in rows))
        c["vs_spd"] = c["tok_s"] / summary["spd"]["tok_s"] if "spd" in order else None
        c["arbiter_calls"] = sum(r[name]["arbiter_calls"] for r in rows)
        c["overrides"] = sum(r[name]["overrides"] for r in rows)
        c["steps"] = sum(r[name]["steps"] for r in rows)
        c["identical_to_spd"] = (sum(r[name]["ids"] == r["spd"]["ids"] for r in rows)
                                 if "spd" in order else None)
    out["summary"] = summary
    return out


COS_REPLAYED = ("we-sd", "cos-we")  # replayed on the 7B against ``we``


def part_replay(args, pair_result: dict | None) -> dict:
    draft, dweights = get_model("0.5b", args.random)
    target = random_model("7b", vocab=draft.config.vocab_size)
    methods = ["spd", "cospec", *COS_REPLAYED]
    if pair_result is None:  # smoke run without the real pair: synthetic traces
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1000, 100000, (100,), generator=g).tolist()
                   for _ in range(args.prompts)]
        block = [True, True, True, False]  # 3 of 5 drafts accepted, as below
        traces = {m: [[3] * args.new if m in ("spd", "cospec") else block * args.new]
                  * len(prompts) for m in methods}
        lengths = {m: [args.new] * len(prompts) for m in methods}
        source = "synthetic (3 accepted per step)"
    else:
        rows = pair_result["per_prompt"]
        prompts = pair_result["prompt_ids"]
        methods = [m for m in methods if rows[0].get(m, {}).get("trace") is not None]
        traces = {m: [r[m]["trace"] for r in rows] for m in methods}
        lengths = {m: [len(r[m]["ids"]) for r in rows] for m in methods}
        source = "replayed from the real pair (pair part)"
    k = args.k
    we = Combination("we", (0.5, 0.5))

    def one(name: str, i: int, budget: int | None = None) -> tuple[float, int]:
        """(seconds, tokens) of method ``name`` on prompt i; the target generates as many
        tokens as spd did, ``we`` as many as cos-we did (``budget``: that many instead)."""
        base = {"target": "spd", "we": COS_REPLAYED[-1]}.get(name, name)
        n = lengths[base][i] if budget is None else budget
        if name == "target":
            return ours(target, None, prompts[i], ExactRule(), n)[1], n
        if name in ("we", *COS_REPLAYED):
            trace = CosTrace(traces[name][i], replay=True) if name != "we" else None
            t0 = sync()
            for _ in cos_generate([draft, target], prompts[i], we, name, gamma=k,
                                  max_new_tokens=n, trace=trace):
                pass
            return sync() - t0, n
        rule = ReplayRule(traces[name][i], lookahead=name == "cospec")
        return ours(target, draft, prompts[i], rule, n, k=k)[1], n

    order = ["target", *(m for m in ("spd", "cospec") if m in methods)]
    if COS_REPLAYED[-1] in methods:
        order += ["we", *(m for m in COS_REPLAYED if m in methods)]
    longest = max(range(len(prompts)), key=lambda j: len(prompts[j]))

    def warm() -> None:  # as the pair part's: every shape
        for name in order:
            one(name, longest)
            for budget in warm_up_budgets(k):  # a last block of each draft length
                one(name, 0, budget)

    fast_block.warm_until_settled(warm, rounds=3)
    per: dict[str, list] = {m: [] for m in order}
    captured = {m: 0 for m in order}  # timed runs a capture fell inside
    for i in range(len(prompts)):
        for name in in_turn(order, i):
            before = fast_block.captures()
            per[name].append(one(name, i))
            captured[name] += fast_block.captures() != before
    out = {"draft_weights": dweights, "traces": source, "k": k,
           "target": "Qwen2.5-7B shapes (vocabulary of the draft), random weights"}
    for name, xs in per.items():
        out[name] = {"tokens": sum(n for _, n in xs), "seconds": sum(t for t, _ in xs),
                     "captured_runs": captured[name]}
        out[name]["tok_s"] = out[name]["tokens"] / out[name]["seconds"]
    for name in order[1:]:
        out[name]["vs_target"] = out[name]["tok_s"] / out["target"]["tok_s"]
        if name in COS_REPLAYED:
            out[name]["vs_we"] = out[name]["tok_s"] / out["we"]["tok_s"]
    return out


def prefill_ms(rows: list[dict], name: str) -> float | None:
    """The mean prefill a prompt (ms) of ``name`` over the per-prompt ``rows``, where every
    prompt timed it (the batch-1 loops and fast_block do; None where a loop leaves it 0)."""
    prefill = [r[name].get("prefill_s", 0.0) for r in rows]
    return 1000 * statistics.mean(prefill) if all(prefill) else None


def paired(rows: list[dict], name: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-prompt ratios tok/s of ``name`` ÷ target's (the
    same prompt decoded by both in one run)."""
    ratios = [r[name]["tok_s"] / r["target"]["tok_s"] for r in rows]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, mid, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return mid, q1, q3


def markdown(res: dict) -> str:
    lines = [f"# GPU speed ({res.get('device', '?')})", "", f"Command: `{res['command']}`", ""]
    if "prefill" in res:  # recorded since the batch-1 prefill graphs came
        lines += [f"Prefill: `COSPEC_PREFILL={res['prefill']}`", ""]
    if "check" in res:
        lines += ["## Fast path vs transformers' forward (0.5B shapes, random weights)", "",
                  "| dtype | max |logit diff| | argmax agree | greedy 64: same first |",
                  "|---|---|---|---|"]
        for name, r in res["check"].items():
            lines.append(f"| {name} | {r['max_abs_logit_diff']:.2e} | {r['argmax_agree']}/"
                         f"{r['rows']} | {r['greedy_64_same_prefix']} tokens |")
        lines.append("")
    if "target" in res:
        lines += ["## Target-only decoding, batch 1, bf16, 128-token prompt", "",
                  "| model | weights | cospec tok/s | % roofline | HF eager | HF static "
                  "(compiled) | cospec ÷ eager | cospec ÷ static | roofline tok/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size, r in res["target"].items():
            lines.append(
                f"| {size} | {r['weights']} | {r['ours_tok_s']:.0f} | "
                f"{100 * r['ours_roofline']:.0f}% | {r['hf_eager_tok_s']:.1f} "
                f"({100 * r['hf_eager_roofline']:.0f}%) | {r['hf_static_tok_s']:.0f} "
                f"({100 * r['hf_static_roofline']:.0f}%) | {r['ours_vs_hf_eager']:.2f}× | "
                f"{r['ours_vs_hf_static']:.2f}× | {r['roofline_tok_s']:.0f} |")
        lines += ["", "Warm-up (graph capture + compilation, excluded): " + ", ".join(
            f"{s} cospec {r['ours_warmup_s']:.0f} s, HF static {r['hf_static_warmup_s']:.0f} s"
            for s, r in res["target"].items()), ""]
    for key in sorted(k for k in res if k.startswith("pair") and not k.endswith("_wall_s")):
        p = res[key]
        s = p["summary"]
        task, temp = p.get("task", "gsm8k"), p.get("temperature", 0.0)
        lines += [f"## Real pair (1.5B ← 0.5B), {p['prompts']} {task} prompts, T = {temp:g}, "
                  f"k = {p['k']}, ≤ {p['max_new_tokens']} new tokens (part `{key}`)", "",
                  "| method | tokens | tok/s | ÷ target (ours) | median paired ÷ target "
                  "[quartiles] | ÷ we / cd | ÷ *-sd | τ | prefill ms a prompt |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in s.items():
            if isinstance(r, dict):
                base = r.get("vs_we", r.get("vs_cd"))
                sd = r.get("vs_we-sd", r.get("vs_cd-sd"))
                mid, q1, q3 = paired(p["per_prompt"], name)
                prefill = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else ""
                lines.append(f"| {name} | {r['tokens']} | {r['tok_s']:.1f} | "
                             f"{r['vs_target']:.2f}× | {mid:.2f}× [{q1:.2f}, {q3:.2f}] | "
                             f"{f'{base:.2f}×' if base else ''} | {f'{sd:.2f}×' if sd else ''}"
                             f" | {r.get('tau', float('nan')):.2f} | "
                             f"{prefill} |")
        if "spd_vs_hf_assisted" in s:
            lines += ["", f"spd ÷ HF assisted: **{s['spd_vs_hf_assisted']:.2f}×**; HF "
                      f"assisted ÷ HF eager: {s['hf_assisted_vs_hf_eager']:.2f}×."]
        notes = []
        if temp == 0:
            for key, text in (("spd_identical_to_target", "spd output identical to target"),
                              ("spd_block_identical_to_target",
                               "spd-block output identical to target"),
                              ("spd_graph_identical_to_target",
                               "spd-graph output identical to target"),
                              ("spd_graph_int8_identical_to_target",
                               "spd-graph-int8 output identical to target"),
                              ("spd_block_int8_identical_to_target",
                               "spd-block-int8 output identical to target"),
                              ("lookup_identical_to_target",
                               "lookup output identical to target"),
                              ("spd_lookup_identical_to_target",
                               "spd-lookup output identical to target"),
                              ("spd_staged_identical_to_target",
                               "spd-staged output identical to target"),
                              ("spd_staged_int8_identical_to_target",
                               "spd-staged-int8 output identical to target"),
                              ("spd_staged_host_identical_to_target",
                               "spd-staged-host output identical to target"),
                              ("cospec_int8_identical_to_cospec",
                               "cospec-int8 output identical to cospec"),
                              ("cospec_block_identical_to_cospec",
                               "cospec-block output identical to cospec"),
                              ("cospec_block_int8_identical_to_cospec_int8",
                               "cospec-block-int8 output identical to cospec-int8"),
                              ("cos_we_block_identical_to_cos_we",
                               "cos-we-block output identical to cos-we"),
                              ("cos_we_block_int8_identical_to_cos_we_int8",
                               "cos-we-block-int8 output identical to cos-we-int8"),
                              ("cos_we_int8_identical_to_cos_we",
                               "cos-we-int8 output identical to cos-we"),
                              ("cos_we_identical_to_we", "cos-we identical to we"),
                              ("cos_cd_identical_to_cd", "cos-cd identical to cd")):
                if s.get(key) is not None:
                    notes.append(f"{text} on {s[key]}/{p['prompts']}")
            if s.get("spd_identical_to_target") is not None:
                notes[-1 if len(notes) == 1 else 0] += (" (bf16: a verify over k+1 rows and a "
                                                        "1-row step round differently)")
        for name in ("cospec", "cospec-int8", "cospec-block", "cospec-block-int8", "cospec-host",
                     "confidence", "entropy"):
            if name not in s:
                continue
            c = s[name]
            vs_spd = f"{name} ÷ spd {c['vs_spd']:.2f}×, " if c.get("vs_spd") else f"{name}: "
            share = ("its arbiter inside each block's graph" if "block" in name else
                     f"arbiter share of its decode time {100 * c['arbiter_share']:.2f}%")
            notes.append(f"{vs_spd}{share} "
                         f"({c.get('arbiter_calls', '?')} decisions, "
                         f"{c.get('overrides', '?')} draft tokens kept, "
                         f"{c.get('steps', '?')} steps)")
        captured = [f"{m} on prompt {i}" for i, row in enumerate(p["per_prompt"])
                    for m, r in row.items() if r.get("captured")]
        if "captured" in p["per_prompt"][0].get("target", {}):  # recorded since it was added
            notes.append("timed runs that captured a graph (their time includes it): "
                         + (", ".join(captured) if captured else "none"))
        notes.append(f"warm-up {p['warmup_s']:.0f} s")
        lines += ["", "; ".join(notes) + ".", ""]
    if "replay" in res:
        r = res["replay"]
        lines += [f"## Replayed: 7B target (random weights, Qwen2.5-7B shapes) ← 0.5B draft "
                  f"({r['draft_weights']} weights), k = {r['k']}; traces: {r['traces']}", "",
                  "| method | tokens | tok/s | ÷ target | ÷ we |", "|---|---|---|---|---|"]
        for name in ("target", "spd", "cospec", "we", *COS_REPLAYED):
            if name not in r:
                continue
            x = r[name]
            vs_we = f"{x['vs_we']:.2f}×" if "vs_we" in x else ""
            lines.append(f"| {name} | {x['tokens']} | {x['tok_s']:.1f} | "
                         f"{x.get('vs_target', 1.0):.2f}× | {vs_we} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="target,pair,replay")
    ap.add_argument("--random", action="store_true", help="random weights for every model")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3,
                    help="timed runs a model in the target part (the pair parts time each "
                         "method once a prompt, in a balanced rotating order)")
    ap.add_argument("--methods", default="",
                    help="pair parts: only these methods (and target), comma-separated; "
                         "cospec-host: cospec with its decisions on the host path; "
                         "spd-block: spd with each block on the device "
                         "(cospec.fast_block; sampled in parts pair:TASK:T with T > 0, "
                         "seeded per prompt); spd-graph: the same, each block one CUDA graph; "
                         "spd-block-int8 / spd-graph-int8: those with the draft's int8 "
                         "weights (fast.int8_weights); spd-staged-int8 / spd-lookup-int8: "
                         "those methods with the int8 draft (cospec-int8, cos-we-int8 too, "
                         "in their host loops); cospec-block, cos-we-block (-int8): those "
                         "with each block on the device (device_blocks.ruled_block); "
                         "spd-staged-host(-int8): "
                         "spd-staged in cospec.decoding's loop, not the device-side block; "
                         "target-wait: target-only reading each chunk of 8 tokens before "
                         "launching the next (no chunk queued ahead); target-chunk2: chunks "
                         "of 2 tokens, one queued ahead (default: 4, one ahead)")
    ap.add_argument("--hf", action="store_true",
                    help="pair parts at T = 0 also time transformers' eager and assisted generate")
    ap.add_argument("--fused-set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting of cospec.fused, e.g. HOIST=0")
    ap.add_argument("--markdown", action="store_true",
                    help="only rewrite OUT/gpu_speed.md from OUT/gpu_speed.json (no GPU)")
    args = ap.parse_args()
    if args.markdown:
        path = Path(args.out) / "gpu_speed.json"
        if not path.exists():
            ap.error(f"{path} does not exist")
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return
    try:
        fused.configure(args.fused_set)
    except CospecError as e:
        ap.error(str(e))
    unknown = [p for p in args.parts.split(",")
               if p not in ("check", "target", "replay") and pair_part(p) is None]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from check, target, pair, "
                 "pair:TASK:T (TASK gsm8k, humaneval or mbpp; T a temperature), replay")
    if not torch.cuda.is_available():
        ap.error("this script measures the CUDA fast path: it needs a GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_speed.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    import transformers

    res.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=transformers.__version__, prefill=fast.prefill_mode(),
               fused={"COSPEC_FUSED": os.environ.get("COSPEC_FUSED", "auto")}
               | {k: getattr(fused, k) for k in fused.TUNABLE},
               command="PYTHONPATH=. python scripts/gpu_speed.py " + " ".join(
                   f"--{k} {v}" if not isinstance(v, bool) else f"--{k}"
                   for k, v in vars(args).items() if v is not False and k != "fused_set")
               + "".join(f" --fused-set {item}" for item in args.fused_set))
    for part in args.parts.split(","):
        if part in res:
            print("done already:", part)
            continue
        t0 = time.perf_counter()
        if part == "check":
            res[part] = part_check(args)
        elif part == "target":
            res[part] = part_target(args)
        elif pair_part(part):
            res[part] = part_pair(args, *pair_part(part))
        elif part == "replay":
            res[part] = part_replay(args, res.get("pair"))
        res[part + "_wall_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(res))
        (out / "gpu_speed.md").write_text(markdown(res))
        print(f"{part} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
