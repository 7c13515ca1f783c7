"""A few-row projection's weight streaming, three ways, on Qwen2.5 shapes (toy kernels):

    PYTHONPATH=. python scripts/prof_few_rows.py --out DIR [--rows 1,2,6] [--reps 20]
    python scripts/prof_few_rows.py --render DIR      (the .md again from DIR's .json)

The fused layers' few-row kernels (``cospec.kernels``, 2 to 16 rows: the draft's first step
of a block and the verify) put the rows on tl.dot's M side (padded to 16) and 32 weight
columns on its N side; a 6-row step of the 1.5B then costs 1.35× its one-row step, while
cuBLAS's projections hardly grow with the rows (results/gpu/h200/fused-few-row-attention-
chunks/profile.md). cuBLAS's kernels there are "swapped" (tile 192x8: the weight's columns
on the MMA's M side, the few rows on N). This times y = x @ w.T (x [n, K] bf16, w [N, K]),
with no norm and no epilogue, over:

- ``rows-m``: rows on M (16, padded), BLOCK_N weight columns on N, as the fused kernels do;
- ``swap``: BLOCK_N weight columns on M, the rows on N (16): acc [BLOCK_N, 16] = w_tile @
  x.T, so a tile can be 64-256 columns (Hopper's wgmma takes M >= 64);
- ``gemv`` (one row only): products on the CUDA cores, summed at the end (the one-row
  kernels' way);
- ``cublas``: torch's F.linear.

Split-K where a shape has too few column tiles to fill the GPU: each split's partial sums
go to their own slice of a float32 buffer (no reduction: this measures the weight reads).
Each launch reads a different copy of the weight (over 256 MB in all, so none is an L2
hit), 50 launches a CUDA graph. Shapes: the 0.5B's and 1.5B's q/k/v, gate/up and down.
Writes DIR/prof_few_rows.json and .md: each variant's best settings, µs a launch and its
share of the GPU's HBM bandwidth (``gpu_speed.BANDWIDTH``, by the device's name).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import BANDWIDTH  # noqa: E402

from cospec.errors import CospecError  # noqa: E402

SHAPES = {  # name: (K, N) of y = x @ w.T, w [N, K]
    "0.5b q/k/v": (896, 1152), "0.5b gate/up": (896, 9728), "0.5b down": (4864, 896),
    "1.5b q/k/v": (1536, 2048), "1.5b gate/up": (1536, 17920), "1.5b down": (8960, 1536),
}
LAUNCHES = 50
RING_BYTES = 256 << 20


@triton.jit(do_not_specialize=["n", "k_per"])
def rows_m(x_ptr, w_ptr, y_ptr, n, k_per, K: tl.constexpr, N: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[split, :n, cols] = x[:n, share] @ w[cols, share].T, rows on tl.dot's M side."""
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    lo = split * k_per
    for k0 in range(lo, tl.minimum(lo + k_per, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < n) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=ks[:, None] < K, other=0.0)
        acc = tl.dot(x, w, acc)
    tl.store(y_ptr + (split * n + rows[:, None]) * N + cols[None, :], acc,
             mask=rows[:, None] < n)


@triton.jit(do_not_specialize=["n", "k_per"])
def swap(x_ptr, w_ptr, y_ptr, n, k_per, K: tl.constexpr, N: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same with the weight's columns on tl.dot's M side: acc [BLOCK_N, BLOCK_M]."""
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    lo = split * k_per
    for k0 in range(lo, tl.minimum(lo + k_per, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=ks[None, :] < K, other=0.0)
        xt = tl.load(x_ptr + rows[None, :] * K + ks[:, None],
                     mask=(rows[None, :] < n) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(w, xt, acc)
    tl.store(y_ptr + (split * n + rows[None, :]) * N + cols[:, None], acc,
             mask=rows[None, :] < n)


@triton.jit(do_not_specialize=["n", "k_per"])
def gemv(x_ptr, w_ptr, y_ptr, n, k_per, K: tl.constexpr, N: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row (n = 1): products on the CUDA cores, acc [BLOCK_K, BLOCK_N] summed at the end."""
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    lo = split * k_per
    for k0 in range(lo, tl.minimum(lo + k_per, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ks[:, None], mask=ks[:, None] < K, other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=ks[:, None] < K, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + split * N + cols, tl.sum(acc, axis=0))


KERNELS = {"rows-m": rows_m, "swap": swap, "gemv": gemv}
GRIDS = {  # variant: settings (BLOCK_N, BLOCK_K, num_warps, num_stages)
    "rows-m": [(32, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3)],
    "swap": [*itertools.product((64, 128), (128, 256), (4, 8), (3,)), (128, 128, 4, 4),
             (128, 256, 8, 4)],
    "gemv": [(8, 256, 4, 3), (16, 256, 4, 3), (8, 512, 4, 3)],
}


def splits_for(K: int, N: int, block_n: int, block_k: int, sms: int) -> list[int]:
    """Split-K counts to try: 1, and the one that brings the grid to about 2 programs an SM."""
    tiles = N // block_n
    auto = max(1, min(math.ceil(K / block_k), round(2 * sms / tiles)))
    return sorted({1, auto})


def launch(variant: str, x, w, y, n: int, K: int, N: int, setting, split: int) -> None:
    block_n, block_k, warps, stages = setting
    k_per = math.ceil(K / split / block_k) * block_k
    KERNELS[variant][(N // block_n, split)](
        x, w, y, n, k_per, K=K, N=N, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)


def timed(fn, reps: int) -> float:
    """Median µs a launch of fn(i) for i in 0..LAUNCHES-1, replayed from one CUDA graph."""
    for i in range(LAUNCHES):  # compile and warm
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / LAUNCHES)
    return statistics.median(times)


def check(variant: str, x, w, n: int, K: int, N: int, setting, split: int) -> float:
    """Max abs difference of the split sums from x @ w.T in float32."""
    y = torch.zeros(split, n, N, device=x.device, dtype=torch.float32)
    launch(variant, x, w, y, n, K, N, setting, split)
    want = x[:n].float() @ w.float().T
    return float((y.sum(0) - want).abs().max())


def measure(name: str, K: int, N: int, rows: list[int], reps: int) -> list[dict]:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copies = max(2, math.ceil(RING_BYTES / (K * N * 2)))
    ring = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    out = []
    for n in rows:
        x = torch.randn(16, K, device=dev, dtype=torch.bfloat16)
        cub = torch.empty(n, N, device=dev, dtype=torch.bfloat16)
        best = {"shape": name, "K": K, "N": N, "rows": n, "variant": "cublas",
                "us": timed(lambda i, x=x[:n], cub=cub: torch.matmul(
                    x, ring[i % copies].T, out=cub), reps)}
        out.append(best)
        for variant, grid in GRIDS.items():
            if (variant == "gemv" and n > 1) or (variant == "rows-m" and n == 1):
                continue
            tried = []
            for setting in grid:
                for split in splits_for(K, N, setting[0], setting[1], sms):
                    y = torch.empty(split, n, N, device=dev, dtype=torch.float32)
                    try:
                        us = timed(lambda i, v=variant, x=x, n=n, s=setting, p=split, y=y:
                                   launch(v, x, ring[i % copies], y, n, K, N, s, p), reps)
                    except Exception as e:  # noqa: BLE001 (a setting triton refuses)
                        print(f"{name} {n} {variant} {setting} split {split}: {e}"[:200])
                        continue
                    tried.append((us, setting, split))
            if not tried:
                continue
            us, setting, split = min(tried)
            out.append({"shape": name, "K": K, "N": N, "rows": n, "variant": variant,
                        "us": us, "setting": dict(zip(("BLOCK_N", "BLOCK_K", "warps",
                                                       "stages"), setting)),
                        "split": split, "tried": len(tried),
                        "max_abs_err": check(variant, x, ring[0], n, K, N, setting, split)})
        for r in out[-4:]:
            if r["shape"] == name and r["rows"] == n:
                print(f"{name:14s} rows {n}: {r['variant']:7s} {r['us']:7.2f} µs "
                      f"{share(r, hbm(torch.cuda.get_device_name())):5.0%} "
                      f"{r.get('setting', '')} split {r.get('split', '')}", flush=True)
    return out


def hbm(device: str) -> float:
    """The HBM bandwidth (bytes/s) of a GPU by its name (an H100's where unknown)."""
    return next((v for k, v in BANDWIDTH.items() if k in device), BANDWIDTH["H100"])


def share(r: dict, bandwidth: float) -> float:
    """A row's weight bytes a second over ``bandwidth``."""
    return r["K"] * r["N"] * 2 / (r["us"] * 1e-6) / bandwidth


def render(rows: list[dict], device: str) -> str:
    bw = hbm(device)
    lines = [f"{device}, bf16, y = x @ w.T over n rows; µs a launch (median of the graph's "
             f"{LAUNCHES} launches), % of {bw / 1e12:.2f} TB/s; best setting of each variant",
             "", "| shape | K × N | rows | variant | µs | % HBM | BLOCK_N, BLOCK_K, warps, "
             "stages | split-K | max abs err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("setting")
        lines.append(
            f"| {r['shape']} | {r['K']} × {r['N']} | {r['rows']} | {r['variant']} | "
            f"{r['us']:.2f} | {share(r, bw):.0%} | "
            f"{', '.join(str(v) for v in s.values()) if s else '—'} | {r.get('split', '—')} | "
            f"{r['max_abs_err']:.2g} |" if "max_abs_err" in r else
            f"| {r['shape']} | {r['K']} × {r['N']} | {r['rows']} | {r['variant']} | "
            f"{r['us']:.2f} | {share(r, bw):.0%} | — | — | — |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--render", type=Path, metavar="DIR", help="write DIR's .md from its .json")
    p.add_argument("--rows", default="1,2,6")
    p.add_argument("--shapes", default=",".join(SHAPES), help="names from SHAPES")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    if a.render and not (a.render / "prof_few_rows.json").is_file():
        p.error(f"--render: no {a.render / 'prof_few_rows.json'}")
    if a.render:
        saved = json.loads((a.render / "prof_few_rows.json").read_text())
        (a.render / "prof_few_rows.md").write_text(render(saved["results"], saved["device"]))
        return
    if a.out is None:
        p.error("--out DIR (or --render DIR)")
    unknown = [s for s in a.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if not all(r.isdigit() and 1 <= int(r) <= 16 for r in a.rows.split(",")) or a.reps < 1:
        p.error("--rows: integers from 1 to 16, comma-separated; --reps >= 1")
    if not torch.cuda.is_available():
        raise CospecError("prof_few_rows.py needs a CUDA GPU")
    rows = [int(r) for r in a.rows.split(",")]
    results = []
    for name in a.shapes.split(","):
        results += measure(name, *SHAPES[name], rows, a.reps)
        a.out.mkdir(parents=True, exist_ok=True)  # what is done so far, after each shape
        device = torch.cuda.get_device_name()
        (a.out / "prof_few_rows.json").write_text(json.dumps(
            {"device": device, "argv": sys.argv, "results": results}, indent=1))
        (a.out / "prof_few_rows.md").write_text(render(results, device))


if __name__ == "__main__":
    main()
