"""Tokens/s against concurrency for several engines, as a table and a log-log plot.

    python scripts/plot_throughput.py --out DIR [NAME=]FILE [[NAME=]FILE ...]

NAME= names a served FILE's series (two runs that share a --label). Each FILE is one of
- ``bench_batch.json`` (``scripts/bench_batch.py``): cospec's batch engine offline, a series
  per method ("cospec target", "cospec spd", ...);
- a JSON with ``engine`` and ``runs`` (``scripts/vllm_batch.py``, ``scripts/hf_batch.py``):
  another engine offline on the same prompts, a series per method;
- ``load_test.json`` (``scripts/load_test.py``): a server under load, one series named by its
  ``--label`` or its models line, x = concurrent clients.
Offline series use x = B (sequences at once). Writes DIR/throughput.md (one row per x, one
column per series) and DIR/throughput.png (two panels: offline and served, where present).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

Series = dict[str, dict[int, float]]  # name -> {x: tokens/s}


def read(path: Path, label: str | None = None) -> tuple[str, Series]:
    """("offline" or "served", its series) of one result file; ``label`` names a served one."""
    data = json.loads(path.read_text())
    series: Series = {}
    if "levels" in data:  # load_test.json
        cfg = data["config"]
        name = label or cfg.get("label") or (f"{cfg['url']}" if cfg.get("url") else
                                             f"cospec serve {cfg.get('methods', '')}")
        series[name] = {lv["concurrency"]: lv["summary"]["throughput_tokens_per_s"]
                        for lv in data["levels"]}
        return "served", series
    engine = data.get("engine", "cospec")
    for run in data["runs"]:
        series.setdefault(f"{engine} {run['method']}", {})[run["rows"]] = run["tokens_per_s"]
    return "offline", series


def table(kind: str, series: Series) -> str:
    xs = sorted({x for s in series.values() for x in s})
    head = "B" if kind == "offline" else "concurrent clients"
    lines = [f"| {head} | " + " | ".join(series) + " |",
             "|---|" + "---|" * len(series)]
    for x in xs:
        cells = [f"{s[x]:,.0f}" if x in s else "—" for s in series.values()]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("files", nargs="+", help="[NAME=]FILE")
    args = ap.parse_args()
    named = [(a.partition("=")[0], Path(a.partition("=")[2])) if "=" in a else (None, Path(a))
             for a in args.files]
    args.files = [f for _, f in named]
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        ap.error("no such file: " + ", ".join(missing))
    panels: dict[str, Series] = {}
    for label, f in named:
        kind, series = read(f, label)
        if set(series) & set(panels.get(kind, {})):
            ap.error(f"{f}: a series named {', '.join(series)} is already plotted; name it "
                     "with NAME=FILE")
        panels.setdefault(kind, {}).update(series)
    args.out.mkdir(parents=True, exist_ok=True)
    md = ["# Tokens/s against concurrency", "",
          "Files: " + ", ".join(f"`{f}`" for f in args.files), ""]
    for kind, series in panels.items():
        md += [f"## {kind}", "", table(kind, series), ""]
    (args.out / "throughput.md").write_text("\n".join(md))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (kind, series) in zip(axes[0], panels.items()):
        for name, pts in series.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequences at once (B)" if kind == "offline" else "concurrent clients")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(kind)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png", dpi=120)
    print((args.out / "throughput.md").read_text())


if __name__ == "__main__":
    main()
