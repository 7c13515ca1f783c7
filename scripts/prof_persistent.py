"""Where the time of a persistent one-row step goes (``cospec.persistent``), on a GPU:

    PYTHONPATH=. python scripts/prof_persistent.py --out DIR [--sizes 0.5b,1.5b]
        [--prefix 100] [--set NAME=VALUE ...]

Random-weight Qwen2.5 shapes (``gpu_speed.random_model``), bf16, batch 1: a ``--prefix``-token
prefill, then the step's layers in one launch (``persistent.step_layers``) with each task's
times recorded on the GPU's global timer (the launch's TRACE: start, its wait over, end, its
SM). Per stage (q/k/v, attention, o_proj, gate/up, down_proj), over the layers after the
first (the first waits on nothing):

- span: from the stage's first task start to its last task's end;
- seen: each task's wait over, after the stage before it ended (its last task's end): how long
  a finished stage takes to be seen (median, max);
- after: a task's end after its wait: its activation reads, sums and stores (median, max);
- layer: the last down_proj task's end, layer after layer (the step's critical path a layer).

Also the launch's time untraced (eager launches, the median of ``--reps``) and with the trace.
``--set``: settings of ``cospec.fused`` (``fused.configure``). Writes DIR/prof_persistent.json
and DIR/prof_persistent.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import SHAPES, random_model, sync  # noqa: E402

from cospec import fast, fused  # noqa: E402
from cospec.errors import CospecError  # noqa: E402

STAGES = ("q/k/v", "attention", "o_proj", "gate/up", "down_proj")


def stage_table(trace: torch.Tensor, per_stage: list[int], layers: int) -> dict:
    """The module docstring's figures (µs) from ``trace`` [tasks, 4] (ns) of a launch whose
    layers have ``per_stage`` tasks of each stage."""
    t = trace.double() / 1e3
    per = sum(per_stage)
    first = [sum(per_stage[:s]) for s in range(len(per_stage))]
    rows = {}
    ends = {}
    for layer in range(layers):
        for s, n in enumerate(per_stage):
            lo = layer * per + first[s]
            ends[layer, s] = float(t[lo:lo + n, 2].max())
    for s, n in enumerate(per_stage):
        span, seen, after = [], [], []
        for layer in range(1, layers):
            lo = layer * per + first[s]
            block = t[lo:lo + n]
            before = ends[layer - 1, 4] if s == 0 else ends[layer, s - 1]
            span.append(float(block[:, 2].max() - block[:, 0].min()))
            seen += (block[:, 1] - before).tolist()
            after += (block[:, 2] - block[:, 1]).tolist()
        rows[STAGES[s]] = {"tasks": n, "span_us": statistics.median(span),
                           "seen_median_us": statistics.median(seen), "seen_max_us": max(seen),
                           "after_median_us": statistics.median(after),
                           "after_max_us": max(after)}
    steps = [ends[layer, 4] - ends[layer - 1, 4] for layer in range(1, layers)]
    return {"stages": rows, "layer_us": statistics.median(steps),
            "first_start_to_last_end_us": float(t[:, 2].max() - t[:, 0].min()),
            "sms": int(trace[:, 3].unique().numel())}


def measure(size: str, prefix: int, reps: int) -> dict:
    from cospec import persistent  # triton's kernels: only where they run

    model = random_model(size)
    eng = fast.Engine(model, prefix + 16, fused=True)
    if not eng.fused:
        sys.exit(f"{size}: fused layers unavailable: {fused.unsupported(eng)}")
    eng.run(list(range(1000, 1000 + prefix)), 0)
    pos = torch.tensor([prefix], device="cuda")

    def step(trace=None):
        x = eng._embed(torch.tensor([7], device="cuda"))
        return persistent.step_layers(eng, x, pos, eng.kc, eng.vc, False, trace)

    _, consts = persistent.launch(eng._embed(torch.tensor([7], device="cuda")), pos,
                                     persistent._table(eng, eng.kc, eng.vc), eng.cos, eng.sin,
                                     eng.kc[0].shape[1], eng.layers[0], len(eng.layers),
                                     eng.heads, eng.kv_heads, eng.eps, fused)
    per_stage = persistent.stage_tasks(consts)
    trace = torch.zeros(sum(per_stage) * len(eng.layers), 4, dtype=torch.int64, device="cuda")
    times = {}
    for name, tr in (("untraced", None), ("traced", trace)):
        got = []
        for _ in range(reps):
            t0 = sync()
            step(tr)
            got.append((sync() - t0) * 1e3)
        times[name + "_ms"] = statistics.median(got)
    out = stage_table(trace.cpu(), per_stage, len(eng.layers))
    return {"layers": len(eng.layers), "tasks_a_layer": per_stage, **times, **out}


def markdown(out: dict) -> str:
    lines = [f"{out['device']}, bf16, one row at position {out['prefix']}; settings "
             f"{out['settings']}", ""]
    for size, r in out["sizes"].items():
        lines += [f"## {size}: {r['layers']} layers, {r['layer_us']:.1f} µs a layer (last "
                  f"down_proj end to the next), launch {r['untraced_ms']:.3f} ms untraced, "
                  f"{r['traced_ms']:.3f} traced (eager, median), {r['sms']} SMs", "",
                  "| stage | tasks | span µs | seen µs (median / max) | after µs (median / max) |",
                  "|---|---|---|---|---|"]
        for name, s in r["stages"].items():
            lines.append(f"| {name} | {s['tasks']} | {s['span_us']:.2f} | "
                         f"{s['seen_median_us']:.2f} / {s['seen_max_us']:.2f} | "
                         f"{s['after_median_us']:.2f} / {s['after_max_us']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--prefix", type=int, default=100)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    try:
        fused.configure(args.set)
    except CospecError as e:
        sys.exit(f"error: {e}")
    unknown = [s for s in args.sizes.split(",") if s not in SHAPES]
    if unknown:
        sys.exit(f"error: --sizes {','.join(unknown)}: choose from {', '.join(SHAPES)}")
    if args.prefix < 1:
        sys.exit(f"error: --prefix {args.prefix}: at least 1 cached token")
    if not torch.cuda.is_available():  # the arguments checked first, named without a GPU
        sys.exit("needs a CUDA GPU")
    fused.PERSISTENT = 1
    out = {"device": torch.cuda.get_device_name(), "prefix": args.prefix,
           "settings": {k: getattr(fused, k) for k in fused.TUNABLE if k.startswith("PERSIST")},
           "command": " ".join(sys.argv), "sizes": {}}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for size in args.sizes.split(","):
            out["sizes"][size] = measure(size, args.prefix, args.reps)
            (folder / "prof_persistent.json").write_text(json.dumps(out, indent=1))
            (folder / "prof_persistent.md").write_text(markdown(out))
            print(markdown(out), flush=True)


if __name__ == "__main__":
    main()
