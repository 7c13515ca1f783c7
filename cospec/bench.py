"""``cospec verify-cost``: the cost of one cached forward pass over k tokens, against k.

Speculation pays only if verifying k draft tokens costs about one decoding step. This
measures it for each model (median of ``--reps`` after a warm-up, prefix of ``--prefix``
tokens) with each CPU linear mode (``cospec.cpu``: plain, weight-first, and auto — the
faster of the two, measured per shape), and writes JSON + a Markdown table.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from cospec.cpu import MODES
from cospec.decoding import CachedLM


def forward_cost(model, k: int, prefix: int, reps: int, mode: str) -> float:
    """Median seconds of a cached forward over k tokens after ``prefix`` tokens, with CPU
    linear mode ``mode``."""
    os.environ["COSPEC_LINEAR"] = mode  # read by cpu.fast_linear
    lm = CachedLM(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(min(100, vocab // 2), min(5000, vocab), (prefix + k,),
                        generator=g).tolist()
    times = []
    with torch.inference_mode():
        lm.forward(ids[:prefix], keep=1)
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            lm.forward(ids[prefix:], keep=k)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
            lm.crop(prefix)
    os.environ.pop("COSPEC_LINEAR")
    return statistics.median(times)


def cmd_verify_cost(args) -> int:
    from cospec.cli import load_pair_of
    from cospec.report import markdown_table

    pair = load_pair_of(args, need_draft=True)
    ks = [int(x) for x in args.ks.split(",")]
    rows, out = [], {"prefix": args.prefix, "reps": args.reps, "models": {}}
    for name, model in ((args.target, pair.target), (args.draft, pair.draft)):
        res = {}
        for mode in MODES:
            base = None
            for k in ks:
                t = forward_cost(model, k, args.prefix, args.reps, mode)
                base = base or t
                res.setdefault(k, {})[mode] = t
                res[k][f"{mode}_rel"] = t / base
        out["models"][name] = res
        for k, v in res.items():
            row = {"model": name, "k": k}
            for m in MODES:
                row[f"{m}_ms"], row[f"{m}_rel"] = 1000 * v[m], v[f"{m}_rel"]
            rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "verify_cost.json").write_text(json.dumps(out, indent=1))
    table = markdown_table(rows, [("model", "model"), ("k", "k tokens")] + [
        (f"{m}_{x}", f"{m} {'ms' if x == 'ms' else '÷ k=1'}") for m in MODES
        for x in ("ms", "rel")])
    Path(args.out, "verify_cost.md").write_text(
        f"# Cost of a cached forward over k tokens (prefix {args.prefix}, median of "
        f"{args.reps})\n\n{table}\n")
    print(table)
    return 0


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("verify-cost", help="cost of a forward pass over k tokens vs k")
    add_model_args(p)
    p.add_argument("--ks", default="1,2,3,4,5,6,8")
    p.add_argument("--prefix", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_verify_cost)
