"""``cospec verify-cost``: the cost of one cached forward pass over k tokens, against k.

Speculation pays only if verifying k draft tokens costs about one decoding step. This
measures it for the target and the draft (median of ``--reps`` after a warm-up, prefix of
``--prefix`` tokens) with each CPU linear mode (``cospec.cpu``: plain, weight-first, and
auto — the faster of the two on the model's own forwards, per row count), over k = 1 (always
timed: one decoding step, what the ``÷ k=1`` columns divide by) and each k of ``--ks``, and
writes JSON + a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cospec.args import load_pair_of, nonneg_int, positive_int
from cospec.cpu import MODES
from cospec.errors import CospecError, check_writable
from cospec.k_auto import best_k, forward_cost, machine
from cospec.models import context_length

ALPHAS = (0.6, 0.75, 0.9)  # per-token acceptance rates the best draft length is predicted at


def draft_lengths(text: str) -> list[int]:
    """An argparse type for --ks: distinct positive integers separated by commas."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("give draft lengths separated by commas, e.g. 1,2,4")
    ks = []
    for item in items:
        if not item:
            raise argparse.ArgumentTypeError(f"an empty draft length in {text!r}")
        try:
            k = positive_int(item)
        except argparse.ArgumentTypeError as err:
            where = f" (in {text!r})" if len(items) > 1 else ""
            raise argparse.ArgumentTypeError(f"{err}{where}") from None
        if k in ks:
            raise argparse.ArgumentTypeError(f"draft length {k} given twice in {text!r}")
        ks.append(k)
    return ks


def labels(target_name: str, draft_name: str) -> dict[str, str]:
    """The key each role's results are kept under: its model's name, or name (role) where
    the same model is both target and draft."""
    if target_name == draft_name:
        return {"target": f"{target_name} (target)", "draft": f"{draft_name} (draft)"}
    return {"target": target_name, "draft": draft_name}


def command_of(args, ks: list[int]) -> str:
    """The command line that reproduces this run (the models as given, with --models or
    --target and --draft)."""
    flags = [("models", args.models)] if args.models else [("target", args.target),
                                                           ("draft", args.draft)]
    flags += [(name, getattr(args, name, None)) for name in ("device", "dtype")]
    if getattr(args, "tp", 1) > 1:
        flags.append(("tp", args.tp))
    flags += [("ks", ",".join(map(str, ks))), ("prefix", args.prefix), ("reps", args.reps),
              ("out", args.out)]
    return "cospec verify-cost " + " ".join(f"--{k} {v}" for k, v in flags if v is not None)


def cmd_verify_cost(args) -> int:
    from cospec.report import markdown_table

    check_writable(args.out, f"--out {args.out}")  # before the models load and are timed
    ks = sorted(set(args.ks) | {1})
    base = ks[0]  # what the _rel columns divide by: 1, one decoding step
    pair = load_pair_of(args, need_draft=True)
    ctx = context_length(pair)
    if args.prefix + ks[-1] > ctx:  # past them a forward is timed on no real use (or never ends)
        raise CospecError(f"--prefix {args.prefix} + the largest of --ks, {ks[-1]}, pass the "
                          f"models' context of {ctx} positions: give at most {ctx} together")
    keys = labels(pair.target_name, pair.draft_name)
    rows, out = [], {"prefix": args.prefix, "reps": args.reps, "relative_to_k": base,
                     "roles": keys, "models": {}, "machine": machine(),
                     "command": command_of(args, args.ks)}
    for role, model in (("target", pair.target), ("draft", pair.draft)):
        res = {}
        for mode in MODES:
            first = None
            for k in ks:
                t = forward_cost(model, k, args.prefix, args.reps, mode)
                first = t if first is None else first
                res.setdefault(k, {})[mode] = t
                res[k][f"{mode}_rel"] = t / first
        out["models"][keys[role]] = res
        for k, v in res.items():
            row = {"model": keys[role], "role": role, "k": k}
            for m in MODES:
                row[f"{m}_ms"], row[f"{m}_rel"] = 1000 * v[m], v[f"{m}_rel"]
            rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, [("model", "model"), ("role", "role"), ("k", "k tokens")] + [
        (f"{m}_{x}", f"{m} {'ms' if x == 'ms' else f'÷ k={base}'}") for m in MODES
        for x in ("ms", "rel")])
    t_cost = {k: v["auto"] for k, v in out["models"][keys["target"]].items()}
    d_cost = out["models"][keys["draft"]][1]["auto"]
    if len(ks) > 1:  # a verify over k + 1 tokens timed for some k >= 1
        picks = {a: best_k(t_cost, d_cost, a) for a in ALPHAS}
        out["best_k"] = {str(a): {"k": k, "predicted_speedup": x} for a, (k, x) in picks.items()}
        choice = ("\n\nBest draft length here (auto mode), for a per-token acceptance rate "
                  "alpha: " + "; ".join(f"alpha {a}: k = {k} (predicted {x:.2f}x target-only)"
                                         for a, (k, x) in picks.items()) + ".")
    else:
        out["best_k"] = None
        choice = ("\n\nNo best draft length predicted: k drafts are checked by a verify over "
                  "k + 1 tokens, and only k = 1 was timed (give --ks 1,2,... to time more).")
    Path(args.out, "verify_cost.json").write_text(json.dumps(out, indent=1))
    Path(args.out, "verify_cost.md").write_text(
        f"# Cost of a cached forward over k tokens (prefix {args.prefix}, median of "
        f"{args.reps})\n\n{out['machine']}. Command: `{out['command']}`\n\n{table}{choice}\n")
    print(table + choice)
    return 0


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("verify-cost", help="cost of a forward pass over k tokens vs k")
    add_model_args(p)
    p.add_argument("--ks", type=draft_lengths, default=[1, 2, 3, 4, 5, 6, 8],
                   help="token counts to time, distinct positive integers separated by commas "
                        "(default 1,2,3,4,5,6,8); k = 1 is always timed, the ÷ k=1 columns "
                        "divide by it")
    p.add_argument("--prefix", type=nonneg_int, default=200,
                   help="tokens already in the cache before each timed forward (default "
                        "%(default)s)")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="timed forwards per cost, after a warm-up; the median is kept "
                        "(default %(default)s)")
    p.add_argument("--out", required=True, help="folder for verify_cost.json and .md")
    p.set_defaults(func=cmd_verify_cost)
