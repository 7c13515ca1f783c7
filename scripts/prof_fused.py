"""The fused layers (``cospec.fused``) against the reference fast path, on a GPU:

    PYTHONPATH=. python scripts/prof_fused.py --out DIR [--sizes 0.5b,1.5b] [--rows 1,5]
        [--reps 300] [--dtype bf16|fp32] [--set UP_BLOCK_N=64 ...]

Random-weight Qwen2.5 shapes (``gpu_speed.random_model``), batch 1: a 100-token prefill,
then one step over n rows at position 100 (n = 1 a decode step, n = 5 a verify), for each
engine (reference: compiled halves of a layer; fused: five Triton kernels a layer):

- ms per step: the step's CUDA graph replayed ``--reps`` times;
- kernels per step and per layer: torch.profiler over the same forward run without a graph,
  once with every layer and once with the first only (per layer = the difference / (L - 1));
- roofline share: weight bytes a step reads (``gpu_speed.bytes_per_token``) / step time,
  against the HBM bandwidth (4.8e12 B/s on an H200);
- the fused step's logits against the reference's (max |difference|, argmax agreement).

``--set NAME=VALUE`` changes a block size of ``cospec.fused`` (QKV_BLOCK_C, UP_BLOCK_N,
OUT_BLOCK_N, BLOCK_K, DOWN_BLOCK_K, ATTN_BLOCK_S, SPLITS) for a tuning run. Writes
DIR/prof_fused.json and DIR/prof_fused.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import SHAPES, bandwidth, bytes_per_token, random_model, sync  # noqa: E402

from cospec import fast, fused  # noqa: E402

PREFIX = 100


def kernels(eng: fast.Engine, n: int) -> Counter:
    """Names of the GPU kernels one un-graphed forward over n tokens launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng._forward(eng.ids[:n], eng.start, eager=False)
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))


def measure(eng: fast.Engine, n: int, reps: int) -> dict:
    """Time, kernels and logits of a step over n rows at position PREFIX."""
    ids = list(range(2000, 2000 + n))
    logits = eng.run(ids, PREFIX)[0].float().clone()  # captures the graph (compiles) once
    graph = eng.graphs[n][0]
    for _ in range(10):
        graph.replay()
    t0 = sync()
    for _ in range(reps):
        graph.replay()
    step_s = (sync() - t0) / reps
    every = kernels(eng, n)
    layers = eng.layers
    eng.layers = layers[:1]
    try:
        one = kernels(eng, n)
    finally:
        eng.layers = layers
    total, first = sum(every.values()), sum(one.values())
    per_layer = (total - first) / (len(layers) - 1)
    return {"ms_per_step": step_s * 1e3, "kernels_per_step": total,
            "kernels_per_layer": per_layer, "kernels_outside_layers": first - per_layer,
            "kernel_names_one_layer": dict(one.most_common()), "logits": logits}


def run(args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = [int(r) for r in args.rows.split(",")]
    out: dict = {"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                 "bandwidth_B_s": bandwidth(), "blocks": {k: getattr(fused, k) for k in (
                     "QKV_BLOCK_C", "UP_BLOCK_N", "OUT_BLOCK_N", "BLOCK_K", "DOWN_BLOCK_K",
                     "ATTN_BLOCK_S", "SPLITS")}, "sizes": {}}
    for size in args.sizes.split(","):
        model = random_model(size).to(dtype)
        weight_bytes = bytes_per_token(model)
        prompt = list(range(1000, 1000 + PREFIX))
        res: dict = {"weight_bytes": weight_bytes, "layers": len(model.model.layers)}
        for name in ("reference", "fused"):
            eng = fast.Engine(model, 512, fused=name == "fused")
            if eng.fused != (name == "fused"):
                sys.exit(f"{size}: fused layers unavailable: {fused.unsupported(eng)}")
            eng.run(prompt, 0)
            for n in rows:
                r = measure(eng, n, args.reps)
                r["roofline"] = weight_bytes / (r["ms_per_step"] / 1e3) / bandwidth()
                res[f"{name}/n={n}"] = r
                print(size, name, n, {k: v for k, v in r.items()
                                      if k not in ("logits", "kernel_names_one_layer")},
                      flush=True)
            del eng
            gc.collect()
        for n in rows:
            ref, fus = res[f"reference/n={n}"], res[f"fused/n={n}"]
            a, b = ref.pop("logits"), fus.pop("logits")
            fus["max_abs_logit_diff"] = float((a - b).abs().max())
            fus["argmax_agree"] = int((a.argmax(-1) == b.argmax(-1)).sum())
            fus["speedup"] = ref["ms_per_step"] / fus["ms_per_step"]
        out["sizes"][size] = res
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def markdown(out: dict) -> str:
    lines = [f"{out['device']}, {out['dtype']}, batch 1, step at position {PREFIX}; "
             f"roofline = weight bytes / step time / {out['bandwidth_B_s']:.2e} B/s; "
             f"blocks {out['blocks']}", "",
             "| model | rows | engine | ms / step | kernels / step | kernels / layer | "
             "% of HBM roofline | fused ÷ reference | max abs logit diff | argmax agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size, res in out["sizes"].items():
        for key, r in res.items():
            if "/" not in key:
                continue
            name, n = key.split("/n=")
            extra = (f"{r['speedup']:.2f}× | {r['max_abs_logit_diff']:.3g} | "
                     f"{r['argmax_agree']}/{n}" if name == "fused" else "— | — | —")
            lines.append(f"| {size} | {n} | {name} | {r['ms_per_step']:.3f} | "
                         f"{r['kernels_per_step']} | {r['kernels_per_layer']:.1f} | "
                         f"{100 * r['roofline']:.0f} % | {extra} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", default="0.5b,1.5b")
    p.add_argument("--rows", default="1,5")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if not set(args.sizes.split(",")) <= set(SHAPES):
        sys.exit(f"--sizes: some of {','.join(SHAPES)}")
    for item in args.set:
        name, value = item.split("=")
        if not hasattr(fused, name):
            sys.exit(f"--set: cospec.fused has no {name}")
        setattr(fused, name, int(value))
    out = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prof_fused.json").write_text(json.dumps(out, indent=1))
    (args.out / "prof_fused.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
