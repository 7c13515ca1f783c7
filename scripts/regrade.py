"""Re-grade the committed completions with today's graders (no decoding).

    python scripts/regrade.py [--results results] [--tasks gsm8k,math500] [--out results/regrade]

Reads every record file under ``--results`` whose records carry a completion ("id",
"method", "correct", "text": accuracy.jsonl[.gz], speed.jsonl[.gz], ...), grades each text
again with ``get_task(task).grade`` (the task comes from the problem id), and writes, per
record file and method, n, the stored accuracy, the new one, and the records that flipped
right -> wrong and wrong -> right with a few examples. The record files are only read.

Grades are cached by (problem, text, grader source) in ``$COSPEC_CACHE/regrade/`` as they
finish, so an interrupted run resumes, the same text in several files is graded once, and a
change to the package's code (the graders, the sandbox) grades everything afresh.
Code is graded in a thread pool (each grade is a sandboxed subprocess).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

import cospec
from cospec.answers import extract_code, final_answer, function_under_test
from cospec.assets import cache_dir, write_atomic
from cospec.tasks import TASK_NAMES, Problem, get_task

PREFIXES = {"gsm8k/": "gsm8k", "math500/": "math500", "HumanEval/": "humaneval",
            "mbpp/": "mbpp"}
CODE_TASKS = ("humaneval", "mbpp")
EXAMPLES = 3


def task_of(problem_id: str) -> str | None:
    return next((t for p, t in PREFIXES.items() if problem_id.startswith(p)), None)


def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def record_files(root: Path) -> list[Path]:
    """Files of JSON lines under ``root`` whose first record carries a graded completion."""
    found = []
    for path in sorted([*root.rglob("*.jsonl"), *root.rglob("*.jsonl.gz")]):
        with _open(path) as f:
            first = f.readline()
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"id", "method", "correct", "text"} <= row.keys():
            found.append(path)
    return found


def grader_fingerprint() -> str:
    """Hash of the package's source (graders, sandbox and all they import): cached grades
    are only reused for the same code."""
    h = hashlib.sha256()
    for path in sorted(Path(cospec.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def key(problem_id: str, text: str) -> str:
    return hashlib.sha256(f"{problem_id}\0{text}".encode()).hexdigest()[:24]


def problems(task: str) -> dict[str, Problem]:
    t = get_task(task)
    return {p.id: p for p in t.problems("all" if "all" in t.splits else None)}


def snippet(record: dict, problems: dict[str, Problem]) -> str:
    """What the grader looked at: the answer and its context, or the start of the code."""
    task, problem, text = task_of(record["id"]), problems[record["id"]], record["text"]
    if task in CODE_TASKS:
        code = extract_code(text, problem.entry_point or function_under_test(problem.tests))
        return code[:300]
    answer = final_answer(text)
    at = text.rfind(answer) if answer else len(text)
    return f"gold {problem.gold!r}, read {answer!r}: …{text[max(0, at - 160):at + 60]}"


def grade_all(todo: dict[str, tuple[str, Problem, str]], cache: Path, workers: int
              ) -> dict[str, bool]:
    """Grades of ``todo`` (key -> (task, problem, text)), cached ones read, the rest graded
    (code in ``workers`` threads) and appended to ``cache`` as they finish."""
    done: dict[str, bool] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            k, ok = line.split()
            done[k] = ok == "1"
    left = {k: v for k, v in todo.items() if k not in done}
    if not left:
        return done
    with open(cache, "a") as log, ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(left), desc="grading", unit="text", mininterval=5) as bar:
        futures = {pool.submit(get_task(t).grade, p, text): k
                   for k, (t, p, text) in left.items()}
        for fut in as_completed(futures):
            k = futures[fut]
            done[k] = bool(fut.result())
            log.write(f"{k} {int(done[k])}\n")
            log.flush()
            bar.update()
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--tasks", default=",".join(TASK_NAMES),
                    help="comma-separated tasks to re-grade (default: all)")
    ap.add_argument("--out", type=Path, default=Path("results/regrade"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="threads grading code (default: the machine's cores)")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASK_NAMES)
    if unknown:
        sys.exit(f"error: unknown task(s) {', '.join(sorted(unknown))}; choose from "
                 f"{', '.join(TASK_NAMES)}")

    files, by_task = {}, {t: None for t in tasks}
    for path in record_files(args.results):
        with _open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if task_of(r["id"]) in by_task]
        if rows:
            files[path] = rows
    for t in by_task:
        if any(task_of(r["id"]) == t for rows in files.values() for r in rows):
            by_task[t] = problems(t)

    todo = {}
    for rows in files.values():
        for r in rows:
            t = task_of(r["id"])
            todo[key(r["id"], r["text"])] = (t, by_task[t][r["id"]], r["text"])
    cache = cache_dir() / "regrade" / f"{grader_fingerprint()}.txt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    grades = grade_all(todo, cache, args.workers)

    report = []
    for path, rows in files.items():
        groups = defaultdict(list)
        for r in rows:
            groups[r["method"]].append(r)
        for method, group in groups.items():
            t = task_of(group[0]["id"])
            new = [grades[key(r["id"], r["text"])] for r in group]
            flips = {"right_to_wrong": [], "wrong_to_right": []}
            for r, ok in zip(group, new):
                if ok != bool(r["correct"]):
                    flips["wrong_to_right" if ok else "right_to_wrong"].append(r)
            report.append({
                "file": str(path.relative_to(args.results)), "task": t, "method": method,
                "n": len(group),
                "old_accuracy": sum(bool(r["correct"]) for r in group) / len(group),
                "new_accuracy": sum(new) / len(group),
                **{f"n_{name}": len(rs) for name, rs in flips.items()},
                **{name: [{"id": r["id"], "snippet": snippet(r, by_task[task_of(r["id"])])}
                          for r in rs[:EXAMPLES]] for name, rs in flips.items()},
            })
    command = "python scripts/regrade.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"command": command.strip(), "grader": grader_fingerprint(), "texts": len(todo),
           "rows": report}
    write_atomic(args.out / "regrade.json",
                 lambda p: p.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n"))
    write_atomic(args.out / "README.md", lambda p: p.write_text(markdown(out)))
    print(table(report))


def table(report: list[dict]) -> str:
    lines = ["| record file | method | n | stored acc. | new acc. | right→wrong | wrong→right |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report:
        lines.append(f"| {r['file']} | {r['method']} | {r['n']} | {r['old_accuracy']:.3f} | "
                     f"{r['new_accuracy']:.3f} | {r['n_right_to_wrong']} | "
                     f"{r['n_wrong_to_right']} |")
    return "\n".join(lines)


def markdown(out: dict) -> str:
    parts = [
        "# Committed completions re-graded with today's graders",
        "",
        "No decoding: every record file under results/ that stores completions is read and each "
        "text graded again (math: cospec/answers.py; code: the task's grader and sandbox). "
        "The record files are left as they are. Machine-readable: regrade.json.",
        "",
        f"    {out['command']}",
        "",
        f"Grader source fingerprint: `{out['grader']}`.",
        "",
        f"{sum(r['n'] for r in out['rows'])} records ({out['texts']} distinct problem + text "
        f"pairs) in {len({r['file'] for r in out['rows']})} record files: "
        f"{sum(r['n_right_to_wrong'] for r in out['rows'])} flipped right → wrong, "
        f"{sum(r['n_wrong_to_right'] for r in out['rows'])} wrong → right.",
        "",
        table(out["rows"]),
        "",
        "## Examples of flips",
        "",
    ]
    for r in out["rows"]:
        for name in ("right_to_wrong", "wrong_to_right"):
            for ex in r[name]:
                parts += [f"{r['file']} · {r['method']} · {name.replace('_', ' ')} · "
                          f"{ex['id']}:", "", "~~~", ex["snippet"], "~~~", ""]
    if parts[-2] == "## Examples of flips":
        parts.append("No record changed its grade.")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
