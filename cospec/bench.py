"""``cospec verify-cost``: the cost of one cached forward pass over k tokens, against k.

Speculation pays only if verifying k draft tokens costs about one decoding step. This
measures it for each model (median of ``--reps`` after a warm-up, prefix of ``--prefix``
tokens) with each CPU linear mode (``cospec.cpu``: plain, weight-first, and auto — the
faster of the two on the model's own forwards, per row count), and writes JSON + a
Markdown table.
"""

from __future__ import annotations

import json
from pathlib import Path

from cospec.cpu import MODES
from cospec.k_auto import best_k, forward_cost, machine


def cmd_verify_cost(args) -> int:
    from cospec.args import load_pair_of
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
