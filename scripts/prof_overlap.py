"""Draft steps beside the target's verify on one GPU: do they overlap, and at what cost?

    PYTHONPATH=. python scripts/prof_overlap.py --out DIR [--draft 0.5b] [--target 1.5b]
        [--k 5] [--prefix 100,300] [--reps 200]

A speculative block runs the draft's k steps, then the target's verify over k + 1 rows, one
after the other. Both are latency-bound on a GPU (a few µs a kernel, far from the HBM's
speed), so the draft could go on drafting the next block while the target verifies, if the
two ran side by side without slowing each other much. This measures that, on random-weight
Qwen2.5 shapes (bf16, batch 1, fused layers, each step one CUDA graph, at position
``--prefix``):

- alone: the verify (k + 1 rows), a one-row and a two-row draft step;
- for m = 1 .. k + 1 draft steps: one after the other on one stream (the verify, then m
  one-row draft steps) and side by side (the verify on one stream, the m steps on another,
  joined), each repetition waiting for both streams of the last; the verify's own time side
  by side (CUDA events around it);
- overlap = (one after the other - side by side) / the shorter of the two sides: 1 when the
  shorter side is hidden entirely, 0 when side by side is no faster.

The two engines' split-K counters are kept apart (each engine's graphs are captured with its
own buffer): counters shared by kernels running at once would mix their counts.
Writes DIR/prof_overlap.json and DIR/prof_overlap.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import SHAPES, random_model  # noqa: E402

from cospec import fast, fused  # noqa: E402


def engine(model: torch.nn.Module, room: int, prefix: int, rows: list[int]
           ) -> tuple[fast.Engine, dict]:
    """A fused engine of ``model`` (on CUDA), prefilled to ``prefix`` tokens, with the step
    graph of each row count in ``rows`` captured at that position on split-K counters of its
    own: (engine, {rows: graph})."""
    dev = torch.device("cuda")
    fused.fresh_counters(dev)  # a buffer of its own for this engine's graphs
    eng = fast.Engine(model, room, fused=True)
    if not eng.fused or not eng.use_graphs:
        sys.exit(f"fused layers under CUDA graphs unavailable: {fused.unsupported(eng)}")
    eng.run(list(range(1000, 1000 + prefix)), 0)
    graphs = {}
    for n in rows:
        eng.run(list(range(2000, 2000 + n)), prefix)  # captures the graph
        graphs[n] = eng.graphs[n][0]
    torch.cuda.synchronize()
    return eng, graphs


def timed(launch, reps: int) -> float:
    """ms per call of ``launch()`` (which queues GPU work and returns), over ``reps`` calls
    after 10 untimed ones."""
    for _ in range(10):
        launch()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        launch()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def side_by_side(verify, draft, m: int, reps: int) -> dict:
    """The verify on one stream beside m draft steps on another, each repetition joined:
    ms per repetition, and the verify's own median ms among them (CUDA events)."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    done_a, done_b = torch.cuda.Event(), torch.cuda.Event()
    marks = []

    def launch(mark: bool = False) -> None:
        a.wait_event(done_b)
        b.wait_event(done_a)
        with torch.cuda.stream(a):
            if mark:
                marks.append((torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True)))
                marks[-1][0].record()
            verify.replay()
            if mark:
                marks[-1][1].record()
            done_a.record()
        with torch.cuda.stream(b):
            for _ in range(m):
                draft.replay()
            done_b.record()

    done_a.record()
    done_b.record()
    ms = timed(launch, reps)
    torch.cuda.current_stream().wait_event(done_a)
    torch.cuda.current_stream().wait_event(done_b)
    for _ in range(min(reps, 50)):
        launch(mark=True)
    torch.cuda.synchronize()
    verify_ms = statistics.median(s.elapsed_time(e) for s, e in marks)
    return {"ms": ms, "verify_ms": verify_ms}


def measure(args, prefix: int) -> dict:
    room = prefix + 2 * args.k + 16
    drf, dg = engine(random_model(args.draft), room, prefix, [1, 2])
    tgt, tg = engine(random_model(args.target), room, prefix, [args.k + 1])
    verify = tg[args.k + 1]
    alone = {"verify_ms": timed(verify.replay, args.reps),
             "draft_1_row_ms": timed(dg[1].replay, args.reps),
             "draft_2_rows_ms": timed(dg[2].replay, args.reps)}
    rows = []
    for m in range(1, args.k + 2):
        def one_stream(m=m):
            verify.replay()
            for _ in range(m):
                dg[1].replay()
        seq = timed(one_stream, args.reps)
        par = side_by_side(verify, dg[1], m, args.reps)
        shorter = min(alone["verify_ms"], m * alone["draft_1_row_ms"])
        rows.append({"draft_steps": m, "one_stream_ms": seq, "side_by_side_ms": par["ms"],
                     "verify_side_by_side_ms": par["verify_ms"],
                     "overlap": (seq - par["ms"]) / shorter})
        print(prefix, rows[-1], flush=True)
    del drf, tgt
    torch.cuda.empty_cache()
    return {"alone": alone, "rows": rows}


def markdown(out: dict) -> str:
    lines = [f"# Draft steps beside the verify ({out['device']}, bf16, batch 1)", "",
             f"Command: `{out['command']}`", "",
             f"Draft {out['draft']}, target {out['target']} (random weights, fused layers), "
             f"verify over k + 1 = {out['k'] + 1} rows; machine load {out['load']}.", ""]
    for prefix, r in out["prefix"].items():
        a = r["alone"]
        lines += [f"## Position {prefix}", "",
                  f"Alone: verify {a['verify_ms']:.3f} ms, draft step {a['draft_1_row_ms']:.3f} "
                  f"ms (1 row), {a['draft_2_rows_ms']:.3f} ms (2 rows).", "",
                  "| draft steps | one stream ms | side by side ms | verify side by side ms "
                  "| overlap |", "|---|---|---|---|---|"]
        lines += [f"| {x['draft_steps']} | {x['one_stream_ms']:.3f} | {x['side_by_side_ms']:.3f}"
                  f" | {x['verify_side_by_side_ms']:.3f} | {x['overlap']:.2f} |"
                  for x in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def pair_parser(description: str) -> argparse.ArgumentParser:
    """The options of a draft and a target on random shapes timed at cache positions:
    --out, --draft, --target, --k, --prefix, --reps (``pair_args`` checks them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--draft", default="0.5b")
    p.add_argument("--target", default="1.5b")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--prefix", default="100,300")
    p.add_argument("--reps", type=int, default=200)
    return p


def pair_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """``p``'s arguments (``pair_parser``'s), a usage error for sizes not in SHAPES,
    positions not > 0, k or reps below 1."""
    args = p.parse_args()
    for size in (args.draft, args.target):
        if size not in SHAPES:
            p.error(f"{size!r} is not one of {', '.join(SHAPES)}")
    if not all(x.isdigit() and int(x) > 0 for x in args.prefix.split(",")):
        p.error(f"--prefix takes positions > 0, comma-separated, got {args.prefix!r}")
    if args.k < 1 or args.reps < 1:
        p.error("--k and --reps must be >= 1")
    return args


def main() -> None:
    args = pair_args(pair_parser(__doc__.split("\n")[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
           "draft": args.draft, "target": args.target, "k": args.k, "prefix": {}}
    for prefix in (int(x) for x in args.prefix.split(",")):
        out["prefix"][prefix] = measure(args, prefix)
        out["load"] = Path("/proc/loadavg").read_text().split()[0]
        (args.out / "prof_overlap.json").write_text(json.dumps(out, indent=1))
        (args.out / "prof_overlap.md").write_text(markdown(out))


if __name__ == "__main__":
    main()
