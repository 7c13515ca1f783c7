"""Sum up ``lone_client.py`` runs of one folder into its ``summary.json``: each run's totals
(tokens ÷ wall time, decode-only rate, mean τ, requests that started alone) and, for every
pair of runs in the order named, the later one's rate over the earlier one's: total and the
median (min, max) of the per-prompt paired ratios. ``same_text`` counts the prompts whose
text all runs agree on.

    python scripts/lone_summary.py DIR NAME [NAME ...]      # reads DIR/NAME.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics as st
from pathlib import Path


def totals(rows: list[dict]) -> dict:
    tokens, wall = sum(r["tokens"] for r in rows), sum(r["wall_s"] for r in rows)
    return {"tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 3),
            "decode_tokens_per_s": round(tokens / sum(r["decode_s"] for r in rows), 3),
            "mean_tau": round(st.mean(r["tau"] for r in rows), 3),
            "started_alone": sum(r["started_alone"] for r in rows)}


def summary(runs: dict[str, list[dict]]) -> dict:
    """``runs``: name -> a lone_client.py run's rows, the same prompts in the same order."""
    ids = [[r["id"] for r in rows] for rows in runs.values()]
    if any(i != ids[0] for i in ids):
        raise SystemExit("lone_summary.py: the runs do not hold the same prompts in one order")
    out: dict = {"runs": {n: totals(rows) for n, rows in runs.items()}, "paired": {}}
    for a, b in itertools.combinations(runs, 2):
        r = [(y["tokens"] / y["wall_s"]) / (x["tokens"] / x["wall_s"])
             for x, y in zip(runs[a], runs[b])]
        out["paired"][f"{b} / {a}"] = {
            "total": round(out["runs"][b]["tokens_per_s"] / out["runs"][a]["tokens_per_s"], 3),
            "median": round(st.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}
    out["same_text"] = sum(len({r["text"] for r in rows}) == 1 for rows in zip(*runs.values()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("names", nargs="+", help="runs (DIR/NAME.json), the base first")
    args = p.parse_args()
    runs = {}
    for n in args.names:
        try:
            runs[n] = json.loads((args.dir / f"{n}.json").read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"lone_summary.py: cannot read {args.dir / n}.json: {err}") from None
    out = summary(runs)
    (args.dir / "summary.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out["paired"], indent=1))


if __name__ == "__main__":
    main()
