"""What the int8 draft weights cost on this CPU (``cospec.cpu_int8``): products and steps.

    PYTHONPATH=. python scripts/cpu_int8_cost.py --out DIR [--steps 20] [--prefix 120]

1. Each linear shape of the shipped draft (Qwen2.5-0.5B: q, k/v, o, gate/up, down, lm_head)
   over one row, as ``torch.ops.aten._weight_int8pack_mm`` (int8, bfloat16 activations) and
   as the float32 product: enough distinct weight copies (about 200 MB) cycled that every
   call streams its weight from memory, as a decode step does.
2. The gate/up shape over 1-512 rows: int8, float32 x @ W.T and float32 (W @ x.T).T (the
   two orders ``cospec.cpu`` chooses between).
3. The real draft's and target's decode steps (float32, ``--prefix`` tokens cached, the
   median of ``--steps`` one-token forwards through ``cospec.decoding.CachedLM``): the draft
   with its own weights and with int8 copies (``cospec.cpu_int8.int8_weights``).

Writes DIR/cpu_int8_cost.json and .md; the machine's load is recorded beside each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cospec import cpu_int8
from cospec.decoding import CachedLM
from cospec.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair

SHAPES = {"q_proj / o_proj": (896, 896), "k_proj / v_proj": (128, 896),
          "gate_proj / up_proj": (4864, 896), "down_proj": (896, 4864),
          "lm_head": (151936, 896)}
ROWS = (1, 2, 3, 5, 8, 16, 32, 64, 128, 512)
STREAM_BYTES = 200e6  # weight bytes cycled through per shape: well past any cache


def cpu_name() -> str:
    """The processor's model name (Linux), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def seconds(f, reps: int) -> float:
    """Median seconds of ``reps`` calls of f after three warm-up calls."""
    for _ in range(3):
        f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def cycled(make, count: int):
    """A function that calls the next of ``count`` products made by ``make()`` (each over
    its own weight), in turn."""
    items, i = [make() for _ in range(count)], [0]

    def call():
        i[0] = (i[0] + 1) % count
        return items[i[0]]()
    return call


def products(n: int, k: int, rows: int) -> dict[str, float]:
    """ms of the int8 and float32 products of an [n, k] weight over ``rows`` rows."""
    copies8 = max(2, int(STREAM_BYTES // (n * k)))
    copies32 = max(2, int(STREAM_BYTES // (4 * n * k)))
    s = torch.rand(n, dtype=cpu_int8.SCALE_DTYPE)
    xb, xf = torch.randn(rows, k, dtype=cpu_int8.SCALE_DTYPE), torch.randn(rows, k)

    def int8():
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return lambda: torch.ops.aten._weight_int8pack_mm(xb, q, s)

    def plain():
        w = torch.randn(n, k)
        return lambda: xf @ w.T

    def weight_first():
        w = torch.randn(n, k)
        return lambda: (w @ xf.T).T

    reps = max(20, 2 * copies8)
    out = {"int8": seconds(cycled(int8, copies8), reps) * 1e3,
           "float32": seconds(cycled(plain, copies32), reps) * 1e3}
    if rows > 1:
        out["float32 weight-first"] = seconds(cycled(weight_first, copies32), reps) * 1e3
    return out


def step_ms(model, prefix: int, steps: int) -> float:
    """Median ms of a one-token forward after ``prefix`` cached tokens."""
    ids = torch.randint(100, 20000, (prefix + steps + 4,))
    lm = CachedLM(model)
    with torch.inference_mode():
        lm.prefill(ids[:prefix].tolist())
        times = []
        for i in range(steps + 3):
            t = time.perf_counter()
            lm.forward(ids[prefix + i: prefix + i + 1], keep=1)
            times.append(time.perf_counter() - t)
    return statistics.median(times[3:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefix", type=int, default=120)
    args = ap.parse_args()
    res: dict = {"machine": machine()}
    # progress on stderr; no resume: a timing resumed in another run would mix two machine
    # states in one table
    res["shapes"] = {name: {"n": n, "k": k, **products(n, k, 1)}
                     for name, (n, k) in tqdm(SHAPES.items(), desc="shapes, one row")}
    res["shapes_load"] = load()
    res["rows"] = {r: products(4864, 896, r) for r in tqdm(ROWS, desc="gate/up, rows")}
    res["rows_load"] = load()
    pair = load_pair(DEFAULT_TARGET, DEFAULT_DRAFT, "cpu", torch.float32)
    steps = {}
    for name in tqdm(("draft, own weights", "target, own weights", "draft, int8 copies"),
                     desc="decode steps"):
        if name == "draft, int8 copies":
            cpu_int8.int8_weights(pair.draft)
        model = pair.target if name.startswith("target") else pair.draft
        steps[name] = step_ms(model, args.prefix, args.steps)
    res["steps_ms"], res["steps_load"] = steps, load()
    write(Path(args.out) / "cpu_int8_cost", res, table(res))


def machine() -> dict:
    """The processor, its cores, torch's threads, version and CPU capability."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


def write(stem: Path, res: dict, md: str) -> None:
    """``res`` as stem.json, ``md`` as stem.md (their folder made), and ``md`` printed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(md)
    print(md)


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"# int8 products and draft steps on {m['cpu']} ({m['cores']} cores, "
             f"{m['threads']} threads, torch {m['torch']})", "",
             f"One row, weights streamed from memory (load {res['shapes_load']}):", "",
             "| shape | n x k | int8 ms | float32 ms | float32 ÷ int8 |", "|---|---|---|---|---|"]
    for name, r in res["shapes"].items():
        lines.append(f"| {name} | {r['n']} x {r['k']} | {r['int8']:.3f} | {r['float32']:.3f} "
                     f"| {r['float32'] / r['int8']:.2f}× |")
    lines += ["", f"gate/up (4864 x 896) over more rows (load {res['rows_load']}):", "",
              "| rows | int8 ms | float32 ms | float32 weight-first ms |", "|---|---|---|---|"]
    for rows, r in res["rows"].items():
        wf = r.get("float32 weight-first")
        lines.append(f"| {rows} | {r['int8']:.3f} | {r['float32']:.3f} | "
                     f"{'—' if wf is None else f'{wf:.3f}'} |")
    lines += ["", f"Decode steps of the real models, float32 (load {res['steps_load']}):", "",
              "| model | ms a step |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in res["steps_ms"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
