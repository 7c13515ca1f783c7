"""What one speculative block costs on the GPU, weights aside: the draft in bf16 against the
draft's int8 copies (``fast.int8_weights``), beside the target's one-row step.

    PYTHONPATH=. python scripts/prof_block.py --out DIR [--draft 0.5b] [--target 1.5b]
        [--k 5] [--prefix 100,300] [--reps 200] [--tau 4.97,5.69]

On random-weight Qwen2.5 shapes (bf16, batch 1, fused layers, no weights to load), at cache
position ``--prefix``, for each draft (its model's own bf16 weights, then its int8 copies):

- the steps alone (each one CUDA graph): the draft's one-row and two-row steps, the target's
  one-row step and its verify over k + 1 rows;
- the whole block as ``cospec.fast_block`` runs it for greedy spd (``BlockGraph``: the
  draft's two-row first step, k - 1 one-row steps, the verify and the acceptance, one CUDA
  graph), its position reset before every replay (a one-element copy, included);
- with ``--choices``, the bf16 draft's block as greedy cospec and cos-we run it
  (``device_blocks.ruled_block``: the shipped arbiter's choice, the weighted ensemble's at
  λ = 0.5), its pending state reset too: what the in-graph choice adds to a block;
- the block's bound on spd's speed-up: τ × target step ÷ block for each ``--tau`` (tokens a
  block; the defaults are spd's τ at k = 5 on GSM8K heldout and HumanEval, from
  results/gpu/h200/speed-fused-block-graph). It leaves out the prefills and the host, so a
  measured spd sits below it (there, at 1.15× / 1.22× against bounds of ≈ 1.27×).

Random weights draft and verify the same kernels as real ones; only the acceptance differs,
which the bound takes from ``--tau``. Writes DIR/prof_block.json and DIR/prof_block.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import random_model  # noqa: E402
from prof_overlap import engine, pair_args, pair_parser, timed  # noqa: E402

from cospec import fast, fast_block  # noqa: E402
from cospec.arbiter import load_arbiter  # noqa: E402
from cospec.block_choice import ArbiterChoice, CombinationChoice  # noqa: E402
from cospec.cos import Combination  # noqa: E402
from cospec.methods import SHIPPED_ARBITER  # noqa: E402

DRAFTS = ("bf16", "int8")


def choices() -> dict:
    """The ruled blocks' choices ``--choices`` times: cospec's (the shipped arbiter at its
    threshold) and cos-we's (λ = 0.5)."""
    policy = load_arbiter(SHIPPED_ARBITER)
    return {"cospec": ArbiterChoice(policy, policy.threshold, torch.device("cuda")),
            "cos-we": CombinationChoice(Combination("we", (0.5, 0.5)), torch.device("cuda"))}


def measure(tgt_model: torch.nn.Module, drafts: dict[str, torch.nn.Module], k: int,
            prefix: int, reps: int, ruled: dict | None = None) -> dict:
    """The module docstring's times at one position, in ms: the target's steps, then per
    draft (DRAFTS: the same weights, the second model marked by ``fast.int8_weights``) its
    steps and its block."""
    room = prefix + 4 * (k + 1) + 16
    tgt, tg = engine(tgt_model, room, prefix, [1, k + 1])
    out = {"target_1_row_ms": timed(tg[1].replay, reps),
           f"verify_{k + 1}_rows_ms": timed(tg[k + 1].replay, reps)}
    for kind in DRAFTS:
        drf, dg = engine(drafts[kind], room, prefix, [1, 2])
        row = {"draft_1_row_ms": timed(dg[1].replay, reps),
               "draft_2_rows_ms": timed(dg[2].replay, reps)}
        whole = fast_block.BlockGraph(tgt, drf, k)
        whole.seq[:prefix] = torch.arange(1000, 1000 + prefix, device=whole.seq.device)

        def one_block(whole=whole) -> None:
            whole.length.fill_(prefix)
            whole.run()

        row["block_ms"] = timed(one_block, reps)
        for name, choice in (ruled or {}).items() if kind == "bf16" else ():
            graph = fast_block.BlockGraph(tgt, drf, k, 0, choice)
            graph.seq[:prefix] = whole.seq[:prefix]

            def ruled_block(graph=graph) -> None:
                graph.length.fill_(prefix)
                graph.held.pending.zero_()
                graph.run()

            row[f"{name}_block_ms"] = timed(ruled_block, reps)
            del graph
        out[kind] = row
        print(prefix, kind, row, flush=True)
        del whole, drf, dg
    del tgt, tg
    torch.cuda.empty_cache()
    return out


def markdown(out: dict) -> str:
    k, taus = out["k"], out["tau"]
    lines = [f"# One speculative block's cost, bf16 and int8 draft ({out['device']}, batch 1)",
             "", f"Command: `{out['command']}`", "",
             f"Draft {out['draft']}, target {out['target']} (random weights, fused layers, "
             f"every step and the block one CUDA graph), k = {k}; machine load {out['load']}. "
             "Bound: τ × target step ÷ block (no prefill, no host).", ""]
    head = " | ".join(f"bound at τ {t}" for t in taus)
    lines += [f"| position | draft | draft 1 row ms | 2 rows ms | target 1 row ms | verify "
              f"{k + 1} rows ms | block ms | block ÷ bf16's | {head} |",
              "|---" * (8 + len(taus)) + "|"]
    for prefix, r in out["prefix"].items():
        t1 = r["target_1_row_ms"]
        for kind in DRAFTS:
            d = r[kind]
            bounds = " | ".join(f"{t * t1 / d['block_ms']:.2f}×" for t in taus)
            lines.append(f"| {prefix} | {kind} | {d['draft_1_row_ms']:.3f} | "
                         f"{d['draft_2_rows_ms']:.3f} | {t1:.3f} | "
                         f"{r[f'verify_{k + 1}_rows_ms']:.3f} | {d['block_ms']:.3f} | "
                         f"{d['block_ms'] / r['bf16']['block_ms']:.3f} | {bounds} |")
    ruled = [n for n in ("cospec", "cos-we") if any(f"{n}_block_ms" in r["bf16"]
                                                    for r in out["prefix"].values())]
    if ruled:
        lines += ["", "The bf16 draft's block with each ruled choice (`--choices`):", "",
                  "| position | spd block ms | " + " | ".join(
                      f"{n} block ms | ÷ spd's" for n in ruled) + " |",
                  "|---" * (2 + 2 * len(ruled)) + "|"]
        for prefix, r in out["prefix"].items():
            b = r["bf16"]
            lines.append(f"| {prefix} | {b['block_ms']:.3f} | " + " | ".join(
                f"{b[f'{n}_block_ms']:.3f} | {b[f'{n}_block_ms'] / b['block_ms']:.3f}"
                for n in ruled) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = pair_parser(__doc__.split("\n")[0])
    p.add_argument("--tau", default="4.97,5.69", help="tokens a block, for the bound")
    p.add_argument("--choices", action="store_true",
                   help="also the bf16 draft's block with cospec's and cos-we's choices")
    args = pair_args(p)
    try:
        taus = [float(x) for x in args.tau.split(",")]
    except ValueError:
        p.error(f"--tau takes numbers, comma-separated, got {args.tau!r}")
    if not torch.cuda.is_available():
        sys.exit("prof_block.py: needs a CUDA GPU")
    prefixes = [int(x) for x in args.prefix.split(",")]
    tgt_model = random_model(args.target)
    drafts = {kind: random_model(args.draft) for kind in DRAFTS}  # one seed: equal weights
    fast.int8_weights(drafts["int8"])
    out = {"command": "python scripts/prof_block.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "draft": args.draft,
           "target": args.target, "k": args.k, "tau": taus, "reps": args.reps,
           "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "prefix": {}}
    ruled = choices() if args.choices else None  # outside inference mode: policy versions
    with torch.inference_mode():
        for prefix in prefixes:
            out["prefix"][prefix] = measure(tgt_model, drafts, args.k, prefix, args.reps, ruled)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prof_block.json").write_text(json.dumps(out, indent=1))
    (args.out / "prof_block.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
