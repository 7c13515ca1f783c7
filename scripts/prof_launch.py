"""The GPU's floors for a few-row decode step, measured with toy Triton kernels:

    PYTHONPATH=. python scripts/prof_launch.py --out DIR [--reps 50]

What one fused layer (``cospec.fused``: five kernels) could cost at best, as three figures:

- ``launch``: µs per kernel of a CUDA graph of 120 back-to-back launches of a kernel that
  stores one value a program, for grids of 1, the SM count and 4 x the SM count programs:
  the per-kernel cost no kernel under a graph goes below;
- ``stream``: µs per kernel of 24 launches (a graph) that each read B bytes (a separate slice
  each, so none is an L2 hit) spread over 4 programs an SM, for B from 0.25 MB to 256 MB and
  each program loading BLOCKS elements at once (4 KB or 32 KB), and the fit
  t = t0 + B / bandwidth: t0 is a weight-reading kernel's fixed cost, the bandwidth its
  streaming rate at that many bytes in flight;
- ``persistent``: one launch of one program an SM, first with the barriers alone, then reading
  the same bytes as a 0.5B Qwen2.5 layer's five phases (q/k/v, attention, o_proj, gate/up,
  down_proj) for 24 layers, the phases separated by a grid-wide barrier (an atomic counter
  every program spins on), with and without loading each phase's first block before it
  waits (``prefetch``): µs per layer and per phase over the read floor, against the fused
  layers' five launches (31 µs a layer on an H200, results/gpu/h200/fused-attention-combine).

Needs a CUDA GPU and triton; the barrier needs every program resident at once (one an SM).
Writes DIR/prof_launch.json and DIR/prof_launch.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cospec.errors import CospecError  # noqa: E402

MB = 1 << 20
STREAM_MB = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 256)
# Weight bytes of a 0.5B Qwen2.5 layer's phases (bf16): q/k/v 896 x 1152, attention (none),
# o_proj 896 x 896, gate/up 896 x 9728, down_proj 4864 x 896.
LAYER_PHASES = (896 * 1152 * 2, 0, 896 * 896 * 2, 896 * 9728 * 2, 4864 * 896 * 2)
LAYERS = 24
HBM = 4.8e12  # an H200's bandwidth, bytes/s
BLOCKS = (2048, 16384)  # elements a program loads at once (bf16; 4 warps, 8 from 8192 on)


def kernels():
    """The toy kernels (``launch_kernels``: triton imported there, on first use)."""
    import launch_kernels as k

    return k.touch, k.stream, k.persistent


def warps(block: int) -> int:
    return 8 if block >= 8192 else 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def timed(fn, reps: int) -> float:
    """µs per call of ``fn`` replayed ``reps`` times (after a warm-up), by CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def graphed(body) -> torch.cuda.CUDAGraph:
    """``body`` run once eagerly (compiles), then captured into a CUDA graph."""
    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(t0 µs, bytes/s) of the least-squares line t = t0 + B / bw through (B bytes, t µs)."""
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mt = sum(t for _, t in points) / n
    slope = (sum((b - mb) * (t - mt) for b, t in points)
             / sum((b - mb) ** 2 for b, _ in points))
    return mt - slope * mb, 1e6 / slope


def measure(reps: int) -> dict:
    touch, stream, persistent = kernels()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out: dict = {"device": torch.cuda.get_device_name(dev), "sms": sms, "launch": [],
                 "stream": [], "persistent": []}
    flags = torch.zeros(4 * sms, dtype=torch.int32, device=dev)
    for grid in (1, sms, 4 * sms):
        graph = graphed(lambda g=grid: [touch[(g,)](flags) for _ in range(120)])
        out["launch"].append({"programs": grid, "us": timed(graph.replay, reps) / 120})
        print("launch", out["launch"][-1], flush=True)
    progs = 4 * sms
    sums = torch.empty(progs, dtype=torch.float32, device=dev)
    for block, size_mb in itertools.product(BLOCKS, STREAM_MB):
        count = int(size_mb * MB) // 2
        copies = 24 if size_mb <= 64 else 4
        src = torch.ones(copies, count, dtype=torch.bfloat16, device=dev)
        per = _cdiv(_cdiv(count, progs), block) * block
        graph = graphed(lambda s=src, c=copies, p=per, n=count, b=block: [
            stream[(progs,)](s[i], sums, p, n, BLOCK=b, num_warps=warps(b))
            for i in range(c)])
        us = timed(graph.replay, reps) / copies
        out["stream"].append({"block": block, "mb": size_mb, "us": us,
                              "gb_s": count * 2 / us / 1e3})
        print("stream", out["stream"][-1], flush=True)
        del src, graph
    out["stream_fit"] = []
    for block in BLOCKS:
        t0, bw = fit([(r["mb"] * MB, r["us"]) for r in out["stream"] if r["block"] == block])
        out["stream_fit"].append({"block": block, "t0_us": t0, "gb_s": bw / 1e9})
    sizes = torch.tensor([b // 2 for b in LAYER_PHASES], dtype=torch.int64, device=dev)
    zeros = torch.zeros_like(sizes)  # barriers alone
    src = torch.ones(LAYERS * sum(LAYER_PHASES) // 2, dtype=torch.bfloat16, device=dev)
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    per_prog = torch.empty(sms, dtype=torch.float32, device=dev)
    phases = LAYERS * len(LAYER_PHASES)
    floor = LAYERS * sum(LAYER_PHASES) / HBM * 1e6
    for block, prefetch, phase_sizes in [(BLOCKS[0], 0, zeros)] + [
            (b, f, sizes) for b in BLOCKS for f in (0, 1)]:
        def body(b=block, f=prefetch, z=phase_sizes):
            cnt.zero_()
            persistent[(sms,)](src, z, per_prog, cnt, phases, BLOCK=b,
                               PHASES=len(LAYER_PHASES), PREFETCH=f, num_warps=warps(b))
        us = timed(graphed(body).replay, reps)
        read = src.numel() if phase_sizes is sizes else 0  # every element once, or none
        if abs(per_prog.sum().item() - read) > 1e-3 * read:
            raise CospecError(f"the persistent kernel read {per_prog.sum().item():.0f} "
                              f"elements, not {read} (each exactly once)")
        out["persistent"].append({
            "block": block, "prefetch": prefetch, "reads": read > 0, "us": us,
            "us_layer": us / LAYERS, "us_phase_over_floor": (us - floor * (read > 0)) / phases,
            "floor_us": floor * (read > 0)})
        print("persistent", out["persistent"][-1], flush=True)
    return out


def markdown(out: dict) -> str:
    lines = [f"# GPU floors for a few-row step ({out['device']}, {out['sms']} SMs)", "",
             "Made by `PYTHONPATH=. python scripts/prof_launch.py --out DIR`.", "",
             "| kernel (CUDA graph of 120) | programs | µs a kernel |", "|---|---|---|"]
    lines += [f"| store one value a program | {r['programs']} | {r['us']:.2f} |"
              for r in out["launch"]]
    lines += ["", "| read B bytes, 4 programs an SM | elements a load | MB | µs a kernel | GB/s |",
              "|---|---|---|---|---|"]
    lines += [f"| | {r['block']} | {r['mb']} | {r['us']:.2f} | {r['gb_s']:.0f} |"
              for r in out["stream"]]
    lines += [""] + [f"Fit t = t0 + B / bw, {f['block']} elements a load: t0 = "
                     f"{f['t0_us']:.2f} µs, bw = {f['gb_s']:.0f} GB/s." for f in out["stream_fit"]]
    lines += ["", f"| one persistent kernel (a program an SM), {LAYERS} 0.5B layers x 5 phases, "
              "a grid barrier after each | elements a load | prefetch | µs a layer | "
              "µs a phase over the read floor | read floor µs a layer |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {'reads the weights' if r['reads'] else 'barriers alone'} | {r['block']} | "
              f"{r['prefetch']} | {r['us_layer']:.2f} | {r['us_phase_over_floor']:.2f} | "
              f"{r['floor_us'] / LAYERS:.2f} |" for r in out["persistent"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    try:
        if args.reps < 1:
            raise CospecError(f"--reps {args.reps}: at least 1")
        if not torch.cuda.is_available():
            raise CospecError("prof_launch.py needs a CUDA GPU")
        out = measure(args.reps)
    except CospecError as e:
        sys.exit(f"error: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prof_launch.json").write_text(json.dumps(out, indent=1))
    (args.out / "prof_launch.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
