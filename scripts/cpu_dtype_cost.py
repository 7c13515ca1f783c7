"""What float32 and bfloat16 cost the shipped pair's forwards on this CPU.

    PYTHONPATH=. python scripts/cpu_dtype_cost.py --out DIR [--steps 15] [--prefix 120]

For each dtype the pair is loaded in it (``cospec.models.load_pair(..., dtype)``) and each
model timed through ``cospec.decoding.CachedLM``, after an untimed warm-up: a prefill of
``--prefix`` random tokens, the median of ``--steps`` one-token steps after it (three more
discarded first), and one three-token forward after those (a k = 2 verify). Writes
DIR/cpu_dtype_cost.json and .md, the machine's load beside each dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from cpu_int8_cost import load, machine, write
from tqdm import tqdm

from cospec.decoding import CachedLM
from cospec.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair

DTYPES = (torch.float32, torch.bfloat16)


def forward_ms(model, prefix: int, steps: int) -> dict[str, float]:
    """ms of a ``prefix``-token prefill, the median one-token step after it and a
    three-token forward, after one untimed prefill and step (a model's first forwards page
    in its weights and warm torch's kernels: seconds, not the steady cost)."""
    ids = torch.randint(100, 20000, (prefix + steps + 6,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        warm = CachedLM(model)
        warm.prefill(ids[:prefix])
        warm.forward(ids[prefix:prefix + 1], keep=1)
    lm = CachedLM(model)
    with torch.inference_mode():
        t = time.perf_counter()
        lm.prefill(ids[:prefix])
        prefill = time.perf_counter() - t
        times = []
        for i in range(prefix, prefix + steps + 3):
            t = time.perf_counter()
            lm.forward(ids[i:i + 1], keep=1)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        lm.forward(ids[prefix + steps + 3:prefix + steps + 6], keep=3)
        three = time.perf_counter() - t
    return {"prefill_ms": prefill * 1e3, "step_ms": statistics.median(times[3:]) * 1e3,
            "three_tokens_ms": three * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--prefix", type=int, default=120)
    args = ap.parse_args()
    res: dict = {"machine": machine(), "prefix": args.prefix, "dtypes": {}}
    for dtype in tqdm(DTYPES, desc="dtypes"):  # no resume: see cpu_int8_cost.py
        pair = load_pair(DEFAULT_TARGET, DEFAULT_DRAFT, "cpu", dtype)
        res["dtypes"][str(dtype).removeprefix("torch.")] = {
            "target": forward_ms(pair.target, args.prefix, args.steps),
            "draft": forward_ms(pair.draft, args.prefix, args.steps), "load": load()}
        del pair
    write(Path(args.out) / "cpu_dtype_cost", res, table(res))


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"# float32 and bfloat16 forwards on {m['cpu']} ({m['cores']} cores, "
             f"{m['threads']} threads, torch {m['torch']}, {m['capability']})", "",
             f"| dtype | model | prefill of {res['prefix']} ms | step ms | 3 tokens ms | load |",
             "|---|---|---|---|---|---|"]
    for dtype, r in res["dtypes"].items():
        for model in ("target", "draft"):
            f = r[model]
            lines.append(f"| {dtype} | {model} | {f['prefill_ms']:.0f} | {f['step_ms']:.1f} | "
                         f"{f['three_tokens_ms']:.1f} | {r['load']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
