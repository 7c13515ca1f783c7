"""``cospec verify-cost``: the cost of one cached forward pass over k tokens, against k.

Speculation pays only if verifying k draft tokens costs about one decoding step. This
measures it for each model (median of ``--reps`` after a warm-up, prefix of ``--prefix``
tokens) with each CPU linear mode (``cospec.cpu``: plain, weight-first, and auto — the
faster of the two on the model's own forwards, per row count), and writes JSON + a
Markdown table.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cospec.assets import cache_dir, write_atomic
from cospec.cpu import MODES, TRIALS
from cospec.decoding import CachedLM
from cospec.errors import CospecError


def forward_cost(model, k: int, prefix: int, reps: int, mode: str) -> float:
    """Median seconds of a cached forward over k tokens after ``prefix`` tokens, with CPU
    linear mode ``mode`` (``auto``: timed once the order is chosen)."""
    before = os.environ.get("COSPEC_LINEAR")
    os.environ["COSPEC_LINEAR"] = mode  # read by cpu.fast_linear
    lm = CachedLM(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(min(100, vocab // 2), min(5000, vocab), (prefix + k,),
                        generator=g).tolist()
    times = []
    with torch.inference_mode():
        lm.forward(ids[:prefix], keep=1)
        warm = 1 + (2 * TRIALS if mode == "auto" else 0)  # the choice's own timed forwards
        for rep in range(reps + warm):
            t0 = time.perf_counter()
            lm.forward(ids[prefix:], keep=k)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= warm:
                times.append(time.perf_counter() - t0)
            lm.crop(prefix)
    if before is None:
        os.environ.pop("COSPEC_LINEAR")
    else:
        os.environ["COSPEC_LINEAR"] = before
    return statistics.median(times)


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), core count and torch version."""
    import platform

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def best_k(target_s: dict[int, float], draft_s: float, alpha: float) -> tuple[int, float]:
    """The draft length with the most tokens per second, and its predicted speedup over
    target-only decoding, from measured forward costs (``target_s[n]``: the target over n
    tokens; ``draft_s``: one draft step) if each draft token is accepted with probability
    ``alpha``: a block of k drafts costs k draft steps + a verify over k + 1 tokens and
    commits (1 - alpha^(k+1)) / (1 - alpha) tokens on average."""
    speed = {k: (1 - alpha ** (k + 1)) / (1 - alpha) / (k * draft_s + target_s[k + 1])
             for k in range(1, max(target_s)) if k + 1 in target_s}
    k = max(speed, key=speed.get)
    return k, speed[k] * target_s[1]


AUTO_ALPHA = 0.85   # per-token acceptance assumed by --k auto (GSM8K: tau 2.70 at k = 2,
                    # 3.95 at k = 4 on the default pair, i.e. alpha = 0.85-0.9)
AUTO_KS = range(1, 8)  # --k auto picks k in 1..6 (a verify over k + 1 <= 7 tokens)


def auto_k(pair, alpha: float = AUTO_ALPHA) -> int:
    """The draft length ``best_k`` predicts fastest for ``pair`` on this machine, from the
    pair's own forward costs (CPU only: on CUDA the fast path's costs are not these).

    Timed once per machine, models, dtype, thread count and ``COSPEC_LINEAR``; the costs are
    kept in the cache folder (``k-auto.json``), so later runs reuse the same k."""
    param = next(pair.target.parameters())
    if param.device.type != "cpu":
        raise CospecError("--k auto times CPU forwards; on a GPU give a number (the GPU "
                          "results use --k 5)")
    mode = os.environ.get("COSPEC_LINEAR", "auto")
    key = " | ".join([machine(), pair.target_name, str(pair.draft_name), str(param.dtype),
                      f"{torch.get_num_threads()} threads", f"linear {mode}"])
    path = cache_dir() / "k-auto.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or cut by a crash: timed again
        known = {}
    if key not in known:
        print("--k auto: timing the pair's forwards once on this machine ...", file=sys.stderr,
              flush=True)
        known[key] = {"target_s": {n: forward_cost(pair.target, n, 128, 3, mode)
                                   for n in AUTO_KS},
                      "draft_s": forward_cost(pair.draft, 1, 128, 3, mode)}
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(known, indent=1)))
    costs = known[key]
    k, speedup = best_k({int(n): t for n, t in costs["target_s"].items()}, costs["draft_s"],
                        alpha)
    print(f"--k auto: k = {k} (predicted {speedup:.2f}x target-only at acceptance {alpha}; "
          f"costs in {path})", file=sys.stderr, flush=True)
    return k


def cmd_verify_cost(args) -> int:
    from cospec.cli import load_pair_of
    from cospec.report import markdown_table

    pair = load_pair_of(args, need_draft=True)
    ks = [int(x) for x in args.ks.split(",")]
    rows, out = [], {"prefix": args.prefix, "reps": args.reps, "models": {},
                     "machine": machine(), "command": "cospec verify-cost " + " ".join(
                         f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                         if k in ("target", "draft", "ks", "prefix", "reps", "out"))}
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
    table = markdown_table(rows, [("model", "model"), ("k", "k tokens")] + [
        (f"{m}_{x}", f"{m} {'ms' if x == 'ms' else '÷ k=1'}") for m in MODES
        for x in ("ms", "rel")])
    t_cost = {k: v["auto"] for k, v in out["models"][args.target].items()}
    d_cost = out["models"][args.draft][1]["auto"] if 1 in ks else None
    choice = ""
    if d_cost is not None and 1 in t_cost:
        picks = {a: best_k(t_cost, d_cost, a) for a in (0.6, 0.75, 0.9)}
        out["best_k"] = {str(a): {"k": k, "predicted_speedup": x} for a, (k, x) in picks.items()}
        choice = ("\n\nBest draft length here (auto mode), for a per-token acceptance rate "
                  "alpha: " + "; ".join(f"alpha {a}: k = {k} (predicted {x:.2f}x target-only)"
                                         for a, (k, x) in picks.items()) + ".")
    Path(args.out, "verify_cost.json").write_text(json.dumps(out, indent=1))
    Path(args.out, "verify_cost.md").write_text(
        f"# Cost of a cached forward over k tokens (prefix {args.prefix}, median of "
        f"{args.reps})\n\n{out['machine']}. Command: `{out['command']}`\n\n{table}{choice}\n")
    print(table + choice)
    return 0


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("verify-cost", help="cost of a forward pass over k tokens vs k")
    add_model_args(p)
    p.add_argument("--ks", default="1,2,3,4,5,6,8")
    p.add_argument("--prefix", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_verify_cost)
