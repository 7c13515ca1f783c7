"""Statistics and rendering for evaluation results: intervals, paired tests, paired speed
ratios, the machine's load, tables, plots."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

from cospec.errors import CospecError


def _eval_extra(module: str):
    """``module`` (scipy.stats, matplotlib), part of the eval extra rather than the core
    install; a clear error saying what to install when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise CospecError(f"{err.msg}: evaluation reports need the eval extra, "
                          "pip install 'cospec[eval]'") from None


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    binomtest = _eval_extra("scipy.stats").binomtest
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return (ci.low, ci.high)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test of paired outcomes (same problems): a vs b.

    Returns the discordant counts (``a_only``: a right, b wrong) and the two-sided p-value.
    """
    binomtest = _eval_extra("scipy.stats").binomtest
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


LOAD_MARGIN = 0.25  # load above the core count a run using every core shows by itself


def machine_load() -> dict:
    """The machine's load averages now (runnable processes over the last 1, 5 and 15 min), its
    core count and the time: taken at the start and end of a speed pass, so that a timing made
    beside other jobs (load above the core count) can be told apart."""
    load1, load5, load15 = os.getloadavg()
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load1": load1, "load5": load5,
            "load15": load15, "cpus": os.cpu_count()}


def in_turn(methods: list[str], i: int) -> list[str]:
    """The order in which ``methods`` decode the i-th prompt of a side-by-side speed run: the
    rows of a balanced (Williams) Latin square, 0, 1, n-1, 2, n-2, ... shifted by one every
    second prompt, and reversed on odd prompts. Over 2n prompts each of the n methods runs
    first twice and directly after each other one at least once, so that what a method
    leaves behind (or the host's state after it) does not fall on the same neighbour every
    time, as under a fixed or merely rotated order."""
    n = len(methods)
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    row = [methods[(j + i // 2) % n] for j in first] if n else []
    return row[::-1] if i % 2 else row


def load_verdict(passes: list[dict]) -> dict:
    """Whether the machine was busier than its cores during any speed pass.

    ``passes``: ``[{"start": machine_load(), "end": machine_load()}, ...]`` (one per pass; a
    resumed run has several). Over: a 1- or 5-minute load average more than LOAD_MARGIN above
    the core count at a start or an end. The run's own threads count too, and a run using
    every core reads a little over it with nothing else running (2.02-2.14 on 2 cores, a
    bench of 2 threads on an otherwise idle 2-core EPYC), so only more means others ran."""
    points = [p[w] for p in passes for w in ("start", "end") if p.get(w)]
    peak = max((max(x["load1"], x["load5"]) for x in points), default=math.nan)
    cpus = min((x["cpus"] for x in points), default=0)
    return {"passes": passes, "peak_load": peak, "cpus": cpus,
            "overloaded": peak > cpus + LOAD_MARGIN}


def median_ci(x: list[float]) -> tuple[float, float]:
    """Exact distribution-free 95% interval of the median (order statistics, as
    ``scipy.stats.quantile_test``); NaN with fewer than 6 values (none reaches 95% then)."""
    quantile_test = _eval_extra("scipy.stats").quantile_test
    if len(x) < 2:
        return (math.nan, math.nan)
    ci = quantile_test(x, q=statistics.median(x), p=0.5).confidence_interval(0.95)
    return (float(ci.low), float(ci.high))


def paired_speed(pairs: list[tuple[dict, dict]], ratio_prefill: bool = False) -> dict:
    """Batch-1 speed of a method against a base on the same prompts.

    ``pairs``: ``[(base record, method record)]``, one per prompt, each record with
    ``generated`` tokens, ``decode_s`` and ``prefill_s``. Rates are totals (all tokens ÷ all
    time), so a prompt that stalled weighs by the time it took, as it did; the per-prompt view is
    the median of paired ratios (method's tokens/s ÷ base's on the same prompt) with its
    interquartile range and exact 95% interval — never a mean of rates, which hides a stall.
    ``ratio_prefill``: the per-prompt rates with prefill time included (for a method whose
    decode time holds its prefill, such as transformers' ``generate`` timed whole).
    """
    def rate(rs: list[dict], prefill: bool) -> float:
        secs = sum(r["decode_s"] + (r["prefill_s"] if prefill else 0.0) for r in rs)
        return sum(r["generated"] for r in rs) / secs if secs > 0 else math.nan

    base, mine = [b for b, _ in pairs], [r for _, r in pairs]
    ratios = [rate([r], ratio_prefill) / rate([b], ratio_prefill) for b, r in pairs
              if b["decode_s"] > 0 and r["decode_s"] > 0 and b["generated"] > 0]
    quart = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2
             else [math.nan] * 3)
    return {"total_tokens": sum(r["generated"] for r in mine),
            "total_decode_s": sum(r["decode_s"] for r in mine),
            "total_prefill_s": sum(r["prefill_s"] for r in mine),
            "tokens_per_s": rate(mine, False), "tokens_per_s_with_prefill": rate(mine, True),
            "speedup": rate(mine, False) / rate(base, False),
            "speedup_with_prefill": rate(mine, True) / rate(base, True),
            "ratio_n": len(ratios),
            "ratio_median": statistics.median(ratios) if ratios else math.nan,
            "ratio_iqr": [quart[0], quart[2]], "ratio_ci95": list(median_ci(ratios))}


def pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts -> Markdown; columns = [(key, header)]; values pre-formatted or numbers."""
    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def plot_accuracy_speed(points: list[dict], path: Path, title: str) -> None:
    """Scatter of accuracy (with 95% interval) vs speedup, one labelled point per method."""
    matplotlib = _eval_extra("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for pt in points:
        if pt.get("speedup") is None or pt.get("accuracy") is None:
            continue
        lo, hi = pt["ci"]
        ax.errorbar(pt["speedup"], 100 * pt["accuracy"],
                    yerr=[[100 * (pt["accuracy"] - lo)], [100 * (hi - pt["accuracy"])]],
                    fmt="o", capsize=3)
        ax.annotate(pt["method"], (pt["speedup"], 100 * pt["accuracy"]),
                    textcoords="offset points", xytext=(6, 4))
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("speedup vs target-only (total decode tokens ÷ time, same prompts and run)")
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
