"""Statistics and rendering for evaluation results: intervals, paired tests, tables, plots."""

from __future__ import annotations

import math
from pathlib import Path

from scipy.stats import binomtest


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return (ci.low, ci.high)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test of paired outcomes (same problems): a vs b.

    Returns the discordant counts (``a_only``: a right, b wrong) and the two-sided p-value.
    """
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


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
    import matplotlib

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
    ax.set_xlabel("speedup vs target-only (decode tokens/s, same run)")
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
