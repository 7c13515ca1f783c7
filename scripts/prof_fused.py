"""The fused layers (``cospec.fused``) against the reference fast path, on a GPU:

    PYTHONPATH=. python scripts/prof_fused.py --out DIR [--sizes 0.5b,1.5b] [--rows 1,5]
        [--reps 300] [--dtype bf16|fp32] [--prefix 100] [--set UP_BLOCK_N=64 ...]
        [--grid PROGRAMS_PER_SM=0,2,4,8 --grid NUM_WARPS=2,4 ... [--grid-reps 100]] [--int8]

Random-weight Qwen2.5 shapes (``gpu_speed.random_model``), batch 1: a ``--prefix``-token
prefill (default 100), then one step over n rows at that position (n = 1 a decode step,
n = 5 a verify; the attention reads the prefix), for each engine (reference: compiled
halves of a layer; fused: five Triton kernels a layer):

- ms per step: the step's CUDA graph replayed ``--reps`` times;
- kernels per step and per layer, and each kernel's device time: torch.profiler over the
  same forward run without a graph and with PDL off (under PDL a kernel's time would include
  its wait for the one before), once with every layer and once with the first only (per
  layer = the difference / (L - 1); the rest is outside the layers: embedding, final norm,
  head). The kernels' summed time against the step's shows how much of a step the GPU
  idles between kernels (with PDL on in the step, it can exceed the step's);
- roofline share: weight bytes a step reads (``gpu_speed.bytes_per_token``) / step time,
  against the HBM bandwidth (4.8e12 B/s on an H200);
- the fused step's logits against the reference's (max |difference|, argmax agreement).

``--set NAME=VALUE`` changes a setting of ``cospec.fused`` (any of ``fused.TUNABLE``: block
sizes, split-K factors, PROGRAMS_PER_SM, NUM_WARPS, NUM_STAGES) for the whole run.
``--grid NAME=V1,V2,..`` (repeatable) sweeps settings in one process: the reference is
measured once a size, the fused engine for every combination of the values (on top of
``--set``; each combination recompiles the kernels it changes), ``--grid-reps`` replays each,
without the kernel counts. The grid's rows, sorted by ms / step, go to the JSON ("grid") and
the markdown, with a ranking of the combinations by the geometric mean of fused ÷ reference
over every size and row count; the main table shows the combination ranked first.
``--int8``: also the fused engine over int8 copies of the projections and lm_head
(``fast.int8_weights``), rows ``int8``, its roofline share by the bytes it reads (int8
weights, float32 scales) and its speed against the fastest bf16 fused row's; with a grid,
every combination for it too (JSON "grid8"), the fastest a row count in the table. Writes
DIR/prof_fused.json and DIR/prof_fused.md.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import SHAPES, bandwidth, bytes_per_token, random_model, sync  # noqa: E402

from cospec import fast, fused  # noqa: E402
from cospec.errors import CospecError  # noqa: E402

PREFIX = 100  # the default --prefix


def kernels(eng: fast.Engine, n: int) -> dict[str, list[float]]:
    """{kernel name: [launches, device µs]} of one un-graphed forward over n tokens."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng._forward(eng.ids[:n], eng.start, eager=False)
        torch.cuda.synchronize()
    return kernel_times(prof.events())


def kernel_times(events) -> dict[str, list[float]]:
    """{name: [launches, total device µs]} of the GPU kernels among profiler events (copies
    and memsets left out), most time first."""
    from torch.autograd import DeviceType

    out: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            t = out.setdefault(e.name, [0, 0.0])
            t[0] += 1
            t[1] += e.device_time_total
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


def per_layer(every: dict[str, list[float]], one: dict[str, list[float]], layers: int
              ) -> list[dict]:
    """Each kernel's launches and device µs in one layer, and outside the layers (embedding,
    final norm, head), from a forward with all ``layers`` layers (``every``) and one with the
    first only (``one``): a layer = (every - one) / (layers - 1), outside = one - a layer.
    Most time in a layer first."""
    rows = []
    for name in every.keys() | one.keys():
        (ce, te), (co, to) = every.get(name, [0, 0.0]), one.get(name, [0, 0.0])
        count, us = (ce - co) / (layers - 1), (te - to) / (layers - 1)
        rows.append({"kernel": name, "per_layer": count, "us_per_layer": us,
                     "outside": co - count, "us_outside": to - us})
    return sorted(rows, key=lambda r: (-r["us_per_layer"], -r["us_outside"], r["kernel"]))


def measure(eng: fast.Engine, n: int, reps: int, prefix: int, count: bool = True) -> dict:
    """Time, logits and (``count``) kernels of a step over n rows at position ``prefix``."""
    ids = list(range(2000, 2000 + n))
    logits = eng.run(ids, prefix)[0].float().clone()  # captures the graph (compiles) once
    graph = eng.graphs[n][0]
    for _ in range(10):
        graph.replay()
    t0 = sync()
    for _ in range(reps):
        graph.replay()
    step_s = (sync() - t0) / reps
    if not count:
        return {"ms_per_step": step_s * 1e3, "logits": logits}
    layers, pdl = eng.layers, fused.PDL
    fused.PDL = 0  # each kernel's own time: under PDL it would include its wait for the last
    try:
        every = kernels(eng, n)
        eng.layers = layers[:1]
        one = kernels(eng, n)
    finally:
        eng.layers, fused.PDL = layers, pdl
    total, first = (sum(c for c, _ in k.values()) for k in (every, one))
    per = (total - first) / (len(layers) - 1)
    return {"ms_per_step": step_s * 1e3, "kernels_per_step": total,
            "kernels_per_layer": per, "kernels_outside_layers": first - per,
            "kernel_us_per_step": sum(us for _, us in every.values()),
            "profile": per_layer(every, one, len(layers)), "logits": logits}


def combinations(grid: list[str]) -> list[dict[str, int]]:
    """Every combination of ``--grid NAME=V1,V2,..`` values ([{}] without a grid)."""
    axes = {}
    for item in grid:
        name, values = item.split("=")
        axes[name] = [int(v) for v in values.split(",")]
    return [dict(zip(axes, vs)) for vs in itertools.product(*axes.values())]


def compare(ref: dict, fus: dict, weight_bytes: int) -> None:
    """Add the fused row's roofline share and its agreement with, and speed against, ref."""
    a, b = ref["logits"], fus.pop("logits")
    fus["roofline"] = weight_bytes / (fus["ms_per_step"] / 1e3) / bandwidth()
    fus["max_abs_logit_diff"] = float((a - b).abs().max())
    fus["argmax_agree"] = int((a.argmax(-1) == b.argmax(-1)).sum())
    fus["speedup"] = ref["ms_per_step"] / fus["ms_per_step"]


def run(args, save: Callable[[dict], None]) -> dict:
    """Measure; ``save(out)`` after every size and grid combination (a run cut short keeps
    what it measured)."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = [int(r) for r in args.rows.split(",")]
    combos = combinations(args.grid)
    base = {k: getattr(fused, k) for k in fused.TUNABLE}
    out: dict = {"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                 "prefix": args.prefix,
                 "bandwidth_B_s": bandwidth(), "blocks": base, "sizes": {}}
    if args.grid:
        out["grid_axes"], out["grid_reps"] = args.grid, args.grid_reps
    t_start = time.perf_counter()
    for size in args.sizes.split(","):
        model = random_model(size).to(dtype)
        weight_bytes = bytes_per_token(model)
        prompt = list(range(1000, 1000 + args.prefix))
        res = out["sizes"][size] = {"weight_bytes": weight_bytes,
                                    "layers": len(model.model.layers), "grid": []}
        room = args.prefix + max(rows) + 16
        ref = fast.Engine(model, room, fused=False)
        ref.run(prompt, 0)
        logits = {}
        for n in rows:
            r = res[f"reference/n={n}"] = measure(ref, n, args.reps, args.prefix)
            r["roofline"] = weight_bytes / (r["ms_per_step"] / 1e3) / bandwidth()
            logits[n] = r.pop("logits")
            print(size, "reference", n, brief(r), flush=True)
        del ref
        gc.collect()
        eng = fast.Engine(model, room, fused=True)
        if not eng.fused:
            sys.exit(f"{size}: fused layers unavailable: {fused.unsupported(eng)}")
        eng.run(prompt, 0)

        def saved() -> None:
            out["wall_s"] = time.perf_counter() - t_start
            save(out)

        sweep(eng, f"{size} fused", res["grid"], combos, base, args, res, logits,
              weight_bytes, saved)
        del eng
        if args.int8:
            measure_int8(size, model, res, rows, args, logits, room, prompt, combos, base)
            save(out)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def sweep(eng: fast.Engine, label: str, grid: list, combos: list[dict], base: dict, args,
          res: dict, logits: dict, weight_bytes: int, saved: Callable[[], None] = lambda: None
          ) -> None:
    """``eng``'s steps over each of ``args.rows`` rows at every combination of settings (on
    top of ``base``; back to ``base`` after), against the reference's rows of ``res`` and
    their ``logits``: rows {**measure, settings, n} appended to ``grid``, ``saved()`` after
    each combination. In a grid, a combination that fails (a setting triton cannot compile)
    is printed and left out."""
    for combo in combos:
        for k, v in (base | combo).items():
            setattr(fused, k, v)
        eng.graphs.clear()  # recapture (and recompile) under these settings
        for n in (int(r) for r in args.rows.split(",")):
            try:
                r = (measure(eng, n, args.grid_reps, args.prefix, count=False) if args.grid
                     else measure(eng, n, args.reps, args.prefix))
            except Exception as e:  # noqa: BLE001 (a setting triton cannot compile)
                if not args.grid:
                    raise
                print(label, n, combo, f"failed: {type(e).__name__}: {e}"[:400], flush=True)
                eng.graphs.clear()
                continue
            compare(res[f"reference/n={n}"] | {"logits": logits[n]}, r, weight_bytes)
            grid.append(r | {"settings": combo, "n": n})
            print(label, n, brief(grid[-1]), flush=True)
        saved()
    for k, v in base.items():
        setattr(fused, k, v)


def measure_int8(size: str, model, res: dict, rows: list[int], args, logits: dict, room: int,
                 prompt: list[int], combos: list[dict], base: dict) -> None:
    """Rows ``int8/n=N`` of ``res``: the fused engine over int8 copies of ``model``'s
    projections and lm_head, against the reference's logits and the fastest bf16 fused row,
    at every grid combination (``res["grid8"]``; int8/n=N: the fastest for n rows)."""
    fast.int8_weights(model)
    eng = fast.Engine(model, room, fused=True)
    copies = [c for layer in eng.layers8 for c in layer] + [eng.head8]
    weight_bytes = res["weight_bytes"] - sum(  # each copied weight: 1 byte, not 2, + scales
        c.q.numel() * (model.dtype.itemsize - 1) - 4 * c.s.numel() for c in copies)
    res["int8_weight_bytes"] = weight_bytes
    eng.run(prompt, 0)
    res["grid8"] = []
    sweep(eng, f"{size} int8", res["grid8"], combos, base, args, res, logits, weight_bytes)
    for n in rows:
        res[f"int8/n={n}"] = best = min((g for g in res["grid8"] if g["n"] == n),
                                        key=lambda g: g["ms_per_step"])
        best["vs_fused"] = min(g["ms_per_step"] for g in res["grid"]
                               if g["n"] == n) / best["ms_per_step"]
    del eng
    gc.collect()


def finish(out: dict) -> dict:
    """Sort each size's grid by (rows, ms / step), rank the combinations (with a grid) and
    put the first ranked (without: the only) into the main table as fused/n=N."""
    if "grid_axes" in out:
        out["ranking"] = ranking(out)
        if any(res.get("grid8") for res in out["sizes"].values()):
            out["ranking8"] = ranking(out, "grid8")  # the int8 engine's own
    best = out["ranking"][0]["settings"] if "grid_axes" in out else {}
    for res in out["sizes"].values():
        for key in ("grid", "grid8"):
            res.get(key, []).sort(key=lambda r: (r["n"], r["ms_per_step"]))
        for r in res["grid"]:
            if r["settings"] == best:
                res[f"fused/n={r['n']}"] = r
    return out


def brief(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("logits", "profile")}


def ranking(out: dict, key: str = "grid") -> list[dict]:
    """The grid's combinations by the geometric mean of fused ÷ reference over every size and
    row count, fastest first: of the bf16 fused engine (``key`` "grid") or the int8 one
    ("grid8")."""
    speeds: dict[str, list] = {}
    for res in out["sizes"].values():
        for r in res.get(key, []):
            speeds.setdefault(json.dumps(r["settings"]), []).append(r["speedup"])
    most = max(map(len, speeds.values()), default=0)  # combinations measured everywhere
    speeds = {k: v for k, v in speeds.items() if len(v) == most}
    rank = [{"settings": json.loads(k), "geomean_speedup":
             math.exp(sum(map(math.log, v)) / len(v)), "worst_speedup": min(v)}
            for k, v in speeds.items()]
    return sorted(rank, key=lambda r: -r["geomean_speedup"])


def markdown(out: dict) -> str:
    lines = [f"{out['device']}, {out['dtype']}, batch 1, step at position "
             f"{out.get('prefix', PREFIX)}; "
             f"roofline = weight bytes / step time / {out['bandwidth_B_s']:.2e} B/s; "
             f"blocks {out['blocks']}", "",
             "| model | rows | engine | ms / step | kernels / step | kernels / layer | "
             "% of HBM roofline | fused ÷ reference | max abs logit diff | argmax agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size, res in out["sizes"].items():
        for key, r in res.items():
            if "/n=" not in key:
                continue
            name, n = key.split("/n=")
            extra = (f"{r['speedup']:.2f}× | {r['max_abs_logit_diff']:.3g} | "
                     f"{r['argmax_agree']}/{n}" if name in ("fused", "int8") else "— | — | —")
            counts = (f"{r['kernels_per_step']} | {r['kernels_per_layer']:.1f}"
                      if "kernels_per_step" in r else "— | —")
            lines.append(f"| {size} | {n} | {name} | {r['ms_per_step']:.3f} | {counts} | "
                         f"{100 * r['roofline']:.0f} % | {extra} |")
    faster = [f"{size} {key.split('/')[1]}: {r['vs_fused']:.3f}×"
              + (f" ({settings(r['settings'])})" if "grid_axes" in out else "")
              for size, res in out["sizes"].items() for key, r in res.items()
              if key.startswith("int8/")]
    if faster:
        lines += ["", "int8 against the bf16 fused engine (its ms / step ÷ int8's; the int8 "
                  "roofline counts the bytes int8 reads): " + ", ".join(faster) + "."]
    lines += profile_tables(out)
    if "ranking" not in out:
        return "\n".join(lines) + "\n"
    for key, engine in (("ranking", "the bf16 fused engine"), ("ranking8", "the int8 engine")):
        if key not in out:
            continue
        lines += ["", f"Grid ({' '.join('--grid ' + g for g in out['grid_axes'])}; "
                  f"{out['grid_reps']} replays each; settings on top of the blocks above), "
                  f"{engine} ranked by the geometric mean of its ÷ reference over sizes and "
                  "rows:", "",
                  "| rank | settings | geomean ÷ reference | worst |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {settings(r['settings'])} | {r['geomean_speedup']:.3f}× | "
                  f"{r['worst_speedup']:.3f}× |" for i, r in enumerate(out[key])]
    lines += ["", "Every combination, fastest first per model and rows:", "",
              "| model | rows | settings | ms / step | % of HBM roofline | fused ÷ reference | "
              "max abs logit diff | argmax agree |", "|---|---|---|---|---|---|---|---|"]
    for size, res in out["sizes"].items():
        lines += [f"| {size} | {r['n']} | {tag}{settings(r['settings'])} | "
                  f"{r['ms_per_step']:.3f} | {100 * r['roofline']:.0f} % | {r['speedup']:.2f}× | "
                  f"{r['max_abs_logit_diff']:.3g} | {r['argmax_agree']}/{r['n']} |"
                  for tag, key in (("", "grid"), ("int8: ", "grid8")) for r in res.get(key, [])]
    return "\n".join(lines) + "\n"


def profile_tables(out: dict, top: int = 12) -> list[str]:
    """Markdown lines: for each measured row with a profile, its ``top`` kernels by time a
    layer (names cut to 70 characters; the JSON has them whole)."""
    lines = []
    for size, res in out["sizes"].items():
        for key, r in res.items():
            if "/n=" not in key or "profile" not in r:
                continue
            name, n = key.split("/n=")
            layer_us = sum(k["us_per_layer"] for k in r["profile"])
            lines += ["", f"{size}, {n} row(s), {name}: kernels' device time "
                      f"{r['kernel_us_per_step']:.0f} µs of a {1e3 * r['ms_per_step']:.0f} µs "
                      f"step ({layer_us:.1f} µs a layer, un-graphed forward, PDL off)", "",
                      "| kernel | launches a layer | µs a layer | share of a layer | "
                      "launches outside layers | µs outside |", "|---|---|---|---|---|---|"]
            lines += [f"| `{k['kernel'][:70]}` | {k['per_layer']:.1f} | {k['us_per_layer']:.2f} | "
                      f"{100 * k['us_per_layer'] / layer_us if layer_us else 0:.0f} % | "
                      f"{k['outside']:.1f} | {k['us_outside']:.2f} |" for k in r["profile"][:top]]
    return lines


def settings(combo: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in combo.items()) or "(as set)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", default="0.5b,1.5b")
    p.add_argument("--rows", default="1,5")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--prefix", type=int, default=PREFIX,
                   help="cached tokens before the measured step (its attention reads them)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,..")
    p.add_argument("--grid-reps", type=int, default=100)
    p.add_argument("--int8", action="store_true",
                   help="also the fused engine over int8 copies of the weights")
    args = p.parse_args()
    if not set(args.sizes.split(",")) <= set(SHAPES):
        sys.exit(f"--sizes: some of {','.join(SHAPES)}")
    for item in args.grid:
        name, _, values = item.partition("=")
        if name not in fused.TUNABLE or not all(v.lstrip("-").isdigit()
                                                for v in values.split(",")):
            sys.exit(f"--grid {item}: NAME=INT,INT.., NAME one of {', '.join(fused.TUNABLE)}")
    if args.prefix < 1:
        sys.exit(f"--prefix {args.prefix}: at least 1 cached token")
    try:
        fused.configure(args.set)
    except CospecError as e:
        sys.exit(f"--set: {e}")
    if not torch.cuda.is_available():  # the arguments checked first, named without a GPU
        sys.exit("needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)

    def save(out: dict) -> None:
        out = finish(json.loads(json.dumps(out)))
        if not args.grid:
            for res in out["sizes"].values():
                del res["grid"]
                res.pop("grid8", None)
        (args.out / "prof_fused.json").write_text(json.dumps(out, indent=1))
        (args.out / "prof_fused.md").write_text(markdown(out))

    save(run(args, save))
    print((args.out / "prof_fused.md").read_text())


if __name__ == "__main__":
    main()
