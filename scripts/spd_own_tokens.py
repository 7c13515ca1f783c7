"""spd scored with its own tokens beside target-only: regrade both with today's graders, count
identical outputs, accuracy with a Wilson 95 % interval and an exact McNemar test.

    python scripts/spd_own_tokens.py results/gpu/h200/spd-own-tokens
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from regrade import grade_all, grader_fingerprint, key  # noqa: E402

from cospec.assets import cache_dir  # noqa: E402
from cospec.report import mcnemar, wilson  # noqa: E402
from cospec.sandbox import kind  # noqa: E402
from cospec.tasks import get_task  # noqa: E402


def one(folder: Path) -> dict:
    recs = [json.loads(x) for x in gzip.decompress(
        (folder / "accuracy.jsonl.gz").read_bytes()).decode().splitlines()]
    cfg = json.loads((folder / "config.json").read_text())
    task = get_task(cfg["task"])
    problems = {p.id: p for p in task.problems(cfg["split"])}
    by = {(r["id"], r["method"]): r for r in recs}
    ids = sorted({i for i, m in by if m == "spd"})
    pairs = [(i, m) for i in ids for m in ("target", "spd")]
    todo = {key(i, by[(i, m)]["text"]): (cfg["task"], problems[i], by[(i, m)]["text"])
            for i, m in pairs}
    # regrade.py's cached, resumable grading (keyed by problem, text and grader source)
    cache = cache_dir() / "regrade" / f"{grader_fingerprint()}.txt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    grades = grade_all(todo, cache, 4)
    grade = {(i, m): grades[key(i, by[(i, m)]["text"])] for i, m in pairs}
    out = {"folder": str(folder), "task": cfg["task"], "n": len(ids),
           "identical": sum(by[(i, "spd")]["token_ids"] == by[(i, "target")]["token_ids"]
                            for i in ids),
           "stored_correct": {m: sum(by[(i, m)]["correct"] for i in ids)
                              for m in ("target", "spd")},
           "sandbox": kind() if cfg["task"] != "gsm8k" else None}
    for m in ("target", "spd"):
        k = sum(grade[(i, m)] for i in ids)
        out[m] = {"correct": k, "accuracy": k / len(ids), "ci95": wilson(k, len(ids))}
    out["mcnemar"] = mcnemar([grade[(i, "spd")] for i in ids],
                             [grade[(i, "target")] for i in ids])
    return out


def main() -> None:
    root = Path(sys.argv[1])
    rows = [one(f) for f in sorted(p.parent for p in root.glob("*/accuracy.jsonl.gz"))]
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    md = ["| run | n | identical to target | target % [95% CI] | spd % [95% CI] | "
          "spd vs target (+/−) | McNemar p |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s, mc = r["target"], r["spd"], r["mcnemar"]
        md.append(f"| {Path(r['folder']).name} | {r['n']} | {r['identical']}/{r['n']} | "
                  f"{100 * t['accuracy']:.1f} [{100 * t['ci95'][0]:.1f}, "
                  f"{100 * t['ci95'][1]:.1f}] | {100 * s['accuracy']:.1f} "
                  f"[{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}] | "
                  f"+{mc['a_only']}/−{mc['b_only']} | {mc['p_value']:.3g} |")
    print("\n".join(md))
    (root / "table.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
