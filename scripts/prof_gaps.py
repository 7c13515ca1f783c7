"""Where a batch-1 decode's wall time goes on a GPU: the kernels' busy time and the idle gaps
between them, per method, on the real pair.

    PYTHONPATH=. python scripts/prof_gaps.py --out DIR [--methods target,spd,cospec]
        (a method of ``cospec.methods``, or spd-block / spd-graph: ``cospec.fast_block``)
        [--task gsm8k] [--prompts 4] [--new 256] [--k 5]

Each method decodes the prompts once unprofiled (graphs, compiles), then again, each prompt
under its own torch.profiler (the gaps between prompts are not the decode's). The [start,
end) intervals of the GPU's work (kernels, copies, memsets) give, summed over the prompts:

- busy: their union; idle: the decode's span (first start to last end) minus busy;
- the idle gaps by length: short (< SHORT µs: one launch after another), medium, and long
  (>= LONG µs: the GPU waited for the host: a synchronisation, Python between steps);
- per committed token and per step (a verify; for target-only, a token): µs busy and idle;
- the medium and long gaps by the kernels either side (inside one CUDA graph a medium gap is
  the GPU's own, not the host's: which kernels it falls between says where to look).

So the next person sees how much of spd's block is the host's (what one CUDA graph per
speculative block would take back) before building it. Writes DIR/prof_gaps.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
SHORT, LONG = 10.0, 100.0  # µs: the gap classes' bounds
AROUND = 10  # kernel pairs listed a method around its medium and long gaps


class BlockSpd:
    """Greedy spd with each block on the device (``cospec.fast_block``; ``graph``: each block
    one CUDA graph), with a method's ``run`` (ids, None, stats)."""

    def __init__(self, pair, graph: bool = False) -> None:
        self.pair, self.graph = pair, graph

    def run(self, prompt: list[int], *, k: int, max_new_tokens: int, sampling, eos_ids):
        from cospec import fast_block
        from cospec.stats import DecodeStats

        stats = DecodeStats()
        ids = fast_block.spd_greedy(self.pair.target, self.pair.draft, prompt, k=k,
                                    max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    stats=stats, graph=self.graph)
        return ids, None, stats


Span = tuple[float, float, str]  # [start, end) µs of one piece of GPU work, and its name
NAME = 48  # characters of a kernel's name kept


def intervals(events) -> list[Span]:
    """The GPU work among torch.profiler events as ``Span`` s, sorted by start."""
    from torch.autograd import DeviceType

    return sorted((e.time_range.start, e.time_range.end, e.name[:NAME]) for e in events
                  if e.device_type == DeviceType.CUDA)


def idle_gaps(spans: list[Span]) -> dict:
    """Busy (the union of ``spans``, sorted by start), the whole span, idle = span - busy, the
    idle gaps by class: count and µs of short (< SHORT), medium and long (>= LONG), and
    ``around``: for the medium and long gaps, "the work that ended last → the work after"
    -> [gaps, µs] (which kernels the GPU waits between)."""
    out = {"busy_us": 0.0, "span_us": 0.0, "idle_us": 0.0,
           **{f"{c}_{k}": 0 if k == "gaps" else 0.0 for c in ("short", "medium", "long")
              for k in ("gaps", "us")}, "around": {}}
    if not spans:
        return out
    start, end, last = spans[0]
    first = start
    for s, e, name in spans[1:]:
        if s > end:  # a gap
            out["busy_us"] += end - start
            gap = s - end
            cls = "short" if gap < SHORT else "long" if gap >= LONG else "medium"
            out[f"{cls}_gaps"] += 1
            out[f"{cls}_us"] += gap
            if cls != "short":
                _count_around(out["around"], f"{last} → {name}", 1, gap)
            start = s
        if e >= end:
            end, last = e, name
    out["busy_us"] += end - start
    out["span_us"] = end - first
    out["idle_us"] = out["span_us"] - out["busy_us"]
    return out


def total(parts: list[dict]) -> dict:
    """``idle_gaps`` results summed (every number adds up, ``around`` pair by pair)."""
    out = {k: sum(p[k] for p in parts) for k in parts[0] if k != "around"}
    around: dict[str, list] = {}
    for p in parts:
        for pair, (n, us) in p["around"].items():
            _count_around(around, pair, n, us)
    return out | {"around": around}


def _count_around(around: dict[str, list], pair: str, gaps: int, us: float) -> None:
    """Add ``gaps`` gaps of ``us`` µs in all to ``around[pair]`` ([gaps, µs])."""
    seen = around.setdefault(pair, [0, 0.0])
    seen[0], seen[1] = seen[0] + gaps, seen[1] + us


def per_unit(gaps: dict, tokens: int, steps: int) -> dict:
    """µs busy and idle a committed token and a step, and the idle share of the span."""
    return {"tokens": tokens, "steps": steps,
            "busy_us_per_token": gaps["busy_us"] / max(tokens, 1),
            "idle_us_per_token": gaps["idle_us"] / max(tokens, 1),
            "idle_us_per_step": gaps["idle_us"] / max(steps, 1),
            "long_us_per_step": gaps["long_us"] / max(steps, 1),
            "idle_share": gaps["idle_us"] / gaps["span_us"] if gaps["span_us"] else 0.0}


def markdown(res: dict) -> str:
    lines = [f"{res['device']}, {res['task']}, {res['prompts']} prompts, k = {res['k']}, "
             f"<= {res['new']} new tokens, EOS respected; gaps: short < {SHORT:g} µs, "
             f"long >= {LONG:g} µs"
             + (f"; COSPEC_PREFILL={res['prefill']}" if "prefill" in res else ""), "",
             "| method | tokens | steps | busy µs / token | idle µs / token | idle µs / step | "
             "long gaps µs / step | idle share | gaps short / medium / long |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["methods"].items():
        lines.append(f"| {name} | {r['tokens']} | {r['steps']} | {r['busy_us_per_token']:.0f} | "
                     f"{r['idle_us_per_token']:.0f} | {r['idle_us_per_step']:.0f} | "
                     f"{r['long_us_per_step']:.0f} | {100 * r['idle_share']:.1f} % | "
                     f"{r['short_gaps']} / {r['medium_gaps']} / {r['long_gaps']} |")
    for name, r in res["methods"].items():
        top = sorted(r.get("around", {}).items(), key=lambda kv: -kv[1][1])[:AROUND]
        if not top:
            continue
        lines += ["", f"{name}: the medium and long gaps by the work either side of them (the "
                  f"{len(top)} largest by µs; a step = {r['steps']})", "",
                  "| work before → work after | gaps | gaps / step | µs / step |",
                  "|---|---|---|---|"]
        lines += [f"| `{pair}` | {n} | {n / max(r['steps'], 1):.2f} | "
                  f"{us / max(r['steps'], 1):.1f} |" for pair, (n, us) in top]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="target,spd,cospec")
    p.add_argument("--task", default="gsm8k", choices=("gsm8k", "humaneval", "mbpp"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--k", type=int, default=5)
    args = p.parse_args()
    if args.prompts < 1 or args.new < 1 or args.k < 1:
        p.error("--prompts, --new and --k: at least 1")
    if not torch.cuda.is_available():
        p.error("this script profiles the CUDA fast path: it needs a GPU")
    from gpu_speed import real_pair, task_prompts
    from torch.profiler import ProfilerActivity, profile

    from cospec import fast
    from cospec.methods import MethodOptions, build_method, eos_ids
    from cospec.sampling import GREEDY

    pair = real_pair()
    eos = eos_ids(pair.tokenizer, pair.target)
    prompts = task_prompts(pair.tokenizer, args.task, args.prompts)
    res = {"device": torch.cuda.get_device_name(), "prefill": fast.prefill_mode(),
           "task": args.task, "prompts": len(prompts),
           "k": args.k, "new": args.new, "methods": {}}
    for name in args.methods.split(","):
        method = (BlockSpd(pair, graph=name == "spd-graph") if name in ("spd-block", "spd-graph")
                  else build_method(name, pair, MethodOptions(), GREEDY))

        for q in prompts:  # graphs captured, kernels compiled
            method.run(q, k=args.k, max_new_tokens=args.new, sampling=GREEDY, eos_ids=eos)
        runs, parts = [], []
        for q in prompts:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runs.append(method.run(q, k=args.k, max_new_tokens=args.new, sampling=GREEDY,
                                       eos_ids=eos))
                torch.cuda.synchronize()
            parts.append(idle_gaps(intervals(prof.events())))
        gaps = total(parts)
        tokens = sum(len(ids) for ids, _, _ in runs)
        steps = sum(stats.steps for _, _, stats in runs)
        res["methods"][name] = gaps | per_unit(gaps, tokens, steps)
        print(name, res["methods"][name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prof_gaps.json").write_text(json.dumps(res, indent=1))
    (args.out / "prof_gaps.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
