"""scripts/code_control.py: the draft's flip against the re-roll control, on shards written in
``cospec collect``'s record format."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cospec.cli import main as cospec_main
from cospec.collect import read_points

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "code_control.py"
_spec = importlib.util.spec_from_file_location("code_control", SCRIPT)
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)


def write_shard(folder: Path, problems: dict[str, tuple], n: int = 0) -> Path:
    """One shard ``folder/shard-{n:04d}.jsonl.gz`` as ``cospec collect`` writes it:
    ``problems`` maps id -> (target right?, [(draft right?, control right?) per point], extra
    fields of the problem record)."""
    folder.mkdir(parents=True, exist_ok=True)
    recs = [{"id": i, "target_correct": ok, "tokens": 20, "mismatches": len(pts),
             "target_ids": list(range(20)), "sandbox": "process", **extra}
            for i, (ok, pts, extra) in problems.items()]
    for i, (ok, pts, _) in problems.items():
        recs += [{"id": i, "position": k, "t": 1, "d": 2, "c": 3, "c_sampled": k % 3 == 0,
                  "features": [0.0] * 13, "target_correct": ok, "draft_correct": d,
                  "control_correct": c, "draft_tokens": 20, "draft_tail": [2, 5],
                  "control_tail": [3, 5]} for k, (d, c) in enumerate(pts)]
    f = folder / f"shard-{n:04d}.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write(json.dumps({"shard_seconds": 1.0}) + "\n")
        fh.writelines(json.dumps(r) + "\n" for r in recs)
    return f


def records(f: Path) -> list[dict]:
    """The records of a shard, without its header line."""
    with gzip.open(f, "rt") as fh:
        return [json.loads(x) for x in fh][1:]


def random_problems(rng, n: int, points: int, fix: tuple[float, float],
                    brk: tuple[float, float]) -> dict[str, tuple]:
    """``n`` target-wrong and ``n`` target-right problems of ``points`` points each; a branch
    fixes with probability ``fix`` (draft, control) and breaks with ``brk``, independently."""
    out = {}
    for j in range(2 * n):
        right = j >= n
        p_ok = (1 - brk[0], 1 - brk[1]) if right else fix
        pts = [(bool(rng.random() < p_ok[0]), bool(rng.random() < p_ok[1]))
               for _ in range(points)]
        out[f"P{j:03d}"] = (right, pts, {"target_logprob": -float(j % 7) * 3})
    return out


def test_counts_of_a_hand_made_example(tmp_path):
    write_shard(tmp_path / "a", {
        "P1": (False, [(True, False), (False, False), (True, True)], {}),
        "P2": (False, [(False, True)], {}),
        "P3": (True, [(False, True), (True, True)], {}),
    })
    write_shard(tmp_path / "b", {"P4": (True, [], {}), "P5": (False, [], {})})
    res = cc.analyse([str(tmp_path / "a"), str(tmp_path / "b")], resamples=200)
    a = res["all"]
    assert (a["problems"], a["problems_with_points"], a["points"]) == (5, 3, 6)
    assert a["target"] == {"right": 2, "wrong": 3}
    assert (a["points_on_wrong"], a["points_on_right"]) == (4, 2)
    assert (a["wrong_with_points"], a["right_with_points"]) == (2, 1)
    assert a["control_sampled"] == 3  # position 0 of P1, P2, P3
    kn = {b: {k: (a[b][k]["k"], a[b][k]["n"]) for k in ("fix", "break")} for b in cc.BRANCHES}
    assert kn == {"draft": {"fix": (2, 4), "break": (1, 2)},
                  "control": {"fix": (2, 4), "break": (0, 2)}}
    assert (a["draft"]["problems_fixed"], a["draft"]["problems_broken"]) == (1, 1)
    assert (a["control"]["problems_fixed"], a["control"]["problems_broken"]) == (2, 0)
    fix, brk = a["paired"]["fix"], a["paired"]["break"]
    assert (fix["draft_only"], fix["control_only"], fix["diff"]) == (1, 1, 0.0)
    assert (brk["draft_only"], brk["control_only"], brk["diff"]) == (1, 0, 0.5)
    assert a["draft"]["fix"]["wilson95"] == pytest.approx([0.15, 0.85], abs=1e-3)  # 2 of 4
    assert res["difficulty"]["measure"] == "length"  # no target_logprob recorded


def test_draft_that_fixes_far_more_wins(tmp_path):
    write_shard(tmp_path / "d", random_problems(np.random.default_rng(1), 60, 4,
                                                fix=(0.5, 0.1), brk=(0.2, 0.2)))
    res = cc.analyse([str(tmp_path / "d")], resamples=2000)
    lo, hi = res["all"]["paired"]["fix"]["ci95"]
    assert 0 < lo < 0.4 < hi
    assert res["all"]["paired"]["fix"]["p"] < 1e-6
    assert res["verdict"] == cc.POSITIVE
    assert res["difficulty"]["measure"] == "logprob"


def test_no_difference_and_a_worse_break_rate_give_no_evidence(tmp_path):
    write_shard(tmp_path / "n", random_problems(np.random.default_rng(2), 60, 4,
                                                fix=(0.25, 0.25), brk=(0.2, 0.2)))
    res = cc.analyse([str(tmp_path / "n")], resamples=2000)
    lo, hi = res["all"]["paired"]["fix"]["ci95"]
    assert lo < 0 < hi and res["verdict"] == cc.NEGATIVE
    write_shard(tmp_path / "b", random_problems(np.random.default_rng(3), 60, 4,
                                                fix=(0.5, 0.1), brk=(0.6, 0.1)))
    res = cc.analyse([str(tmp_path / "b")], resamples=2000)
    assert res["all"]["paired"]["fix"]["ci95"][0] > 0
    assert res["all"]["paired"]["break"]["ci95"][0] > 0
    assert res["verdict"] == cc.NEGATIVE


def test_bootstrap_resamples_problems_not_points(tmp_path):
    """All 8 points of a problem share their outcomes: the interval must be as wide as a
    bootstrap of the 40 per-problem differences (a bootstrap of points would be ~sqrt 8
    narrower)."""
    rng = np.random.default_rng(4)
    per = [(bool(rng.random() < 0.5), bool(rng.random() < 0.3)) for _ in range(40)]
    write_shard(tmp_path / "c", {f"P{j}": (False, [x] * 8, {}) for j, x in enumerate(per)})
    res = cc.analyse([str(tmp_path / "c")], resamples=4000)
    lo, hi = res["all"]["paired"]["fix"]["ci95"]
    se = np.std([d - c for d, c in per]) / np.sqrt(len(per))
    assert 0.8 < (hi - lo) / (2 * 1.96 * se) < 1.2


def test_quartiles_split_problems_with_points_by_difficulty(tmp_path):
    probs = random_problems(np.random.default_rng(5), 20, 2, fix=(0.3, 0.3), brk=(0.2, 0.2))
    probs["Z"] = (True, [], {"target_logprob": -100.0})  # no points: in no quartile
    write_shard(tmp_path / "q", probs)
    res = cc.analyse([str(tmp_path / "q")], resamples=100)
    qs = res["quartiles"]
    assert [q["summary"]["problems"] for q in qs] == [10, 10, 10, 10]
    assert [q["range"][0] <= q["range"][1] for q in qs] == [True] * 4
    assert all(a["range"][1] <= b["range"][0] for a, b in zip(qs, qs[1:]))
    assert sum(q["summary"]["points"] for q in qs) == res["all"]["points"] == 80
    res = cc.analyse([str(tmp_path / "q")], how="mismatch_rate", resamples=100)
    assert res["difficulty"]["measure"] == "mismatch_rate"


def test_main_writes_json_and_markdown_with_the_command(tmp_path):
    write_shard(tmp_path / "d", random_problems(np.random.default_rng(6), 10, 2,
                                                fix=(0.3, 0.3), brk=(0.2, 0.2)))
    argv = [str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--resamples", "100"]
    assert cc.main(argv) == 0
    res = json.loads((tmp_path / "out" / "code_control.json").read_text())
    md = (tmp_path / "out" / "code_control.md").read_text()
    assert res["command"].startswith("python scripts/code_control.py ")
    assert f"`{res['command']}`" in md.splitlines()[2] and res["verdict"] in md


def test_reads_what_cospec_collect_writes(tiny_dirs, tmp_path):
    """The synthetic records above have the fields of real ones; the script reads a real run."""
    t, d = tiny_dirs
    out = tmp_path / "div"
    assert cospec_main(["collect", "--target", str(t), "--draft", str(d), "--task", "mbpp",
                        "--split", "dev", "--limit", "3", "--max-new-tokens", "8",
                        "--max-points", "2", "--out", str(out)]) == 0
    real = records(next(out.glob("shard-*.jsonl.gz")))
    fake = records(write_shard(tmp_path / "f", {"P": (True, [(True, False)],
                                                       {"target_logprob": -1.0})}))
    assert {frozenset(r) for r in real} == {frozenset(r) for r in fake}
    res = cc.analyse([str(out)], resamples=100)
    assert res["all"]["problems"] == 3 and res["all"]["points"] == len(read_points([out]))
