"""Is the draft's token information or noise? CoSpec's flip against a re-roll, on code.

    python scripts/code_control.py DIR [DIR ...] --out OUTDIR

``cospec collect`` (cospec/collect.py) writes, per problem, the target's greedy answer graded
(the baseline, ``target_correct``) and, at each of the first divergence points on it, two
branches graded: DRAFT (``draft_correct``: the draft's token there, then the target greedily)
and CONTROL (``control_correct``: a token the draft did not propose, the target's second
choice or, where that is the draft's token, a T = 1 sample of the target without its and the
draft's token, then the target greedily). At a point of a problem the target gets wrong a
branch *fixes* when its answer is right; at a point of a problem the target gets right it
*breaks* when its answer is wrong. If the draft's token fixes no more often than the control,
it tells an arbiter nothing beyond "re-roll here".

Writes OUTDIR/code_control.json and OUTDIR/code_control.md: counts; fix and break rates of
both branches (Wilson intervals, points taken as independent) and the problems fixed or broken
by at least one point; paired draft - control differences over the same points with 95 %
intervals from a cluster bootstrap over problems (points of a problem are correlated) and
exact binomial tests on the discordant points; the same per difficulty quartile of problems;
a verdict.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from cospec.collect import shard_files

BRANCHES = ("draft", "control")
DIFFICULTY = {  # name -> (what the records need, description, problem record -> difficulty)
    "logprob": ("target_logprob", "minus the target's mean token log-probability along its own "
                "greedy answer (higher = less sure)",
                lambda r: -r["target_logprob"] / max(1, r["tokens"])),
    "length": ("tokens", "the length of the target's greedy answer in tokens",
               lambda r: float(r["tokens"])),
    "mismatch_rate": ("mismatches", "draft/target mismatches per 100 tokens of the target's "
                      "greedy answer", lambda r: 100 * r["mismatches"] / max(1, r["tokens"])),
}
POSITIVE = "draft beats control"
NEGATIVE = "no evidence the draft's token carries information beyond a re-roll"


def load(dirs: list[str]) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """(problem records by id, point records, each folder's meta.json or {}) of the shards in
    ``dirs``. A problem found twice, a point without its problem, or a point whose
    ``target_correct`` differs from its problem's is an error."""
    problems: dict[str, dict] = {}
    points: list[dict] = []
    for f in shard_files(dirs):
        with gzip.open(f, "rt") as fh:
            for rec in map(json.loads, fh):
                if "position" in rec:
                    points.append(rec)
                elif "target_correct" in rec:
                    if rec["id"] in problems:
                        raise SystemExit(f"problem {rec['id']} appears twice (again in {f})")
                    problems[rec["id"]] = rec
    for p in points:
        if p["id"] not in problems:
            raise SystemExit(f"point of problem {p['id']} without the problem's record")
        if p["target_correct"] != problems[p["id"]]["target_correct"]:
            raise SystemExit(f"problem {p['id']}: point and problem disagree on the baseline")
    metas = [json.loads((Path(d) / "meta.json").read_text())
             if (Path(d) / "meta.json").is_file() else {} for d in dirs]
    return problems, points, metas


def difficulty(problems: dict[str, dict], how: str) -> tuple[str, dict[str, float]]:
    """(measure name, difficulty per problem id) by ``how`` (a DIFFICULTY key, or "auto": the
    first whose field every problem record has). None of them looks at any branch."""
    names = list(DIFFICULTY) if how == "auto" else [how]
    for name in names:
        field, _, fn = DIFFICULTY[name]
        if all(field in r for r in problems.values()):
            return name, {i: fn(r) for i, r in problems.items()}
    raise SystemExit(f"the problem records lack {DIFFICULTY[names[-1]][0]!r}")


def rate(k: int, n: int) -> dict:
    """k of n with its share and 95 % Wilson interval (None where n = 0)."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "wilson95": None}
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return {"k": k, "n": n, "rate": k / n, "wilson95": [ci.low, ci.high]}


def exact_test(a_only: int, b_only: int) -> dict:
    """Two-sided exact binomial test of ``a_only`` of the discordant points against 1/2."""
    n = a_only + b_only
    return {"draft_only": a_only, "control_only": b_only,
            "p": binomtest(a_only, n).pvalue if n else None}


def per_problem(ids: list[str], problems: dict[str, dict], points: list[dict]) -> dict:
    """Arrays over ``ids`` [P]: ``wrong`` (the target's answer is wrong), ``n`` (points), and
    per branch ``<b>_right`` (points whose branch answer is right)."""
    pos = {i: j for j, i in enumerate(ids)}
    out = {"wrong": np.array([not problems[i]["target_correct"] for i in ids]),
           "n": np.zeros(len(ids))}
    for b in BRANCHES:
        out[f"{b}_right"] = np.zeros(len(ids))
    for p in points:
        if p["id"] in pos:
            j = pos[p["id"]]
            out["n"][j] += 1
            for b in BRANCHES:
                out[f"{b}_right"][j] += bool(p[f"{b}_correct"])
    return out


def cluster_bootstrap(arr: dict, resamples: int, seed: int) -> dict:
    """95 % percentile intervals of the fix and break rate differences (draft - control),
    resampling whole problems with replacement (the rows of ``arr``, see ``per_problem``);
    resamples without points of a kind are dropped for that difference."""
    m = len(arr["n"])
    if m == 0:
        return {"fix": None, "break": None}
    rng = np.random.default_rng(seed)
    w = rng.multinomial(m, np.full(m, 1 / m), size=resamples)          # [R, P] problem counts
    wrong = arr["wrong"].astype(float)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for kind, sel in (("fix", wrong), ("break", 1 - wrong)):
            n = w @ (arr["n"] * sel)
            right = {b: w @ (arr[f"{b}_right"] * sel) for b in BRANCHES}
            # fix: share right on wrong problems; break: share wrong on right problems
            share = {b: right[b] / n if kind == "fix" else 1 - right[b] / n for b in BRANCHES}
            diff = share["draft"] - share["control"]
            diff = diff[np.isfinite(diff)]
            out[kind] = [float(x) for x in np.percentile(diff, [2.5, 97.5])] if len(diff) else None
    return out


def summarize(ids: list[str], problems: dict[str, dict], points: list[dict], resamples: int,
              seed: int) -> dict:
    """Counts, rates, paired comparison and verdict over the problems ``ids`` and their
    points (problems without points count in the baseline only)."""
    keep = set(ids)
    pts = [p for p in points if p["id"] in keep]
    wrong_pts = [p for p in pts if not p["target_correct"]]
    right_pts = [p for p in pts if p["target_correct"]]
    with_points = sorted({p["id"] for p in pts})
    n_wrong = sum(not problems[i]["target_correct"] for i in ids)
    out = {"problems": len(ids), "problems_with_points": len(with_points), "points": len(pts),
           "target": {"right": len(ids) - n_wrong, "wrong": n_wrong},
           "points_on_wrong": len(wrong_pts), "points_on_right": len(right_pts),
           "wrong_with_points": len({p["id"] for p in wrong_pts}),
           "right_with_points": len({p["id"] for p in right_pts}),
           "control_sampled": sum(bool(p["c_sampled"]) for p in pts)}
    for b in BRANCHES:
        ok = f"{b}_correct"
        out[b] = {"fix": rate(sum(bool(p[ok]) for p in wrong_pts), len(wrong_pts)),
                  "break": rate(sum(not p[ok] for p in right_pts), len(right_pts)),
                  "problems_fixed": len({p["id"] for p in wrong_pts if p[ok]}),
                  "problems_broken": len({p["id"] for p in right_pts if not p[ok]})}
    ci = cluster_bootstrap(per_problem(with_points, problems, pts), resamples, seed)
    paired = {}
    for kind, group, event in (("fix", wrong_pts, True), ("break", right_pts, False)):
        hit = [(bool(p["draft_correct"]) == event, bool(p["control_correct"]) == event)
               for p in group]  # (draft fixes / breaks, control fixes / breaks) per point
        d_only, c_only = sum(d and not c for d, c in hit), sum(c and not d for d, c in hit)
        r_d, r_c = out["draft"][kind]["rate"], out["control"][kind]["rate"]
        paired[kind] = {"diff": None if r_d is None else r_d - r_c, "ci95": ci[kind],
                        **exact_test(d_only, c_only)}
    out["paired"] = paired
    out["verdict"] = verdict(paired)
    return out


def verdict(paired: dict) -> str:
    """POSITIVE iff the fix-rate difference's interval lies above 0 and the break-rate
    difference's interval does not lie above 0 (the draft breaks no more, as far as the
    data tell)."""
    fix, brk = paired["fix"]["ci95"], paired["break"]["ci95"]
    return POSITIVE if fix and fix[0] > 0 and not (brk and brk[0] > 0) else NEGATIVE


def quartiles(ids: list[str], score: dict[str, float]) -> list[list[str]]:
    """``ids`` in four groups of (nearly) equal size by increasing ``score``, ties broken by id
    so the split is reproducible."""
    order = sorted(ids, key=lambda i: (score[i], i))
    return [list(g) for g in np.array_split(np.array(order, dtype=object), 4)]


def analyse(dirs: list[str], how: str = "auto", resamples: int = 10_000, seed: int = 0
            ) -> dict:
    """The whole result (see the module doc) as a JSON-able dict, without the command."""
    problems, points, metas = load(dirs)
    name, score = difficulty(problems, how)
    ids = sorted(problems)
    res = {"data": dirs, "meta": metas, "resamples": resamples, "seed": seed,
           "sandbox": sorted({str(r.get("sandbox")) for r in problems.values()}),
           "difficulty": {"measure": name, "description": DIFFICULTY[name][1],
                          "over": "problems with at least one point, Q1 easiest"},
           "all": summarize(ids, problems, points, resamples, seed), "quartiles": []}
    for q, group in enumerate(quartiles(sorted({p["id"] for p in points}), score)):
        block = summarize(group, problems, points, resamples, seed) if group else None
        lo, hi = (score[group[0]], score[group[-1]]) if group else (None, None)
        res["quartiles"].append({"quartile": q + 1, "range": [lo, hi], "summary": block})
    res["verdict"] = res["all"]["verdict"]
    return res


def _pct(r: dict) -> str:
    """'k/n = x.x % [lo, hi]' of a ``rate`` dict."""
    if r["rate"] is None:
        return "–"
    lo, hi = r["wilson95"]
    return f"{r['k']}/{r['n']} = {100 * r['rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff(d: dict) -> str:
    """'+x.x [lo, hi]' in points of a paired difference."""
    if d["diff"] is None:
        return "–"
    ci = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "–"


def _header(cols: list[str]) -> str:
    """A markdown table's header and rule lines."""
    return f"| {' | '.join(cols)} |\n|{'---|' * len(cols)}"


def markdown(res: dict) -> str:
    """The readable table of ``analyse``'s result (with ``command``)."""
    a, meta = res["all"], res["meta"][0] if res["meta"] else {}
    what = ", ".join(f"{k} {meta[k]}" for k in ("task", "split", "target", "draft",
                                                "max_new_tokens", "max_points") if k in meta)
    rows = "\n".join(
        f"| {b} | {_pct(a[b]['fix'])} | {_pct(a[b]['break'])} | {a[b]['problems_fixed']} | "
        f"{a[b]['problems_broken']} |" for b in BRANCHES)
    paired = "\n".join(
        f"| {k} | {_diff(a['paired'][k])} | {a['paired'][k]['draft_only']} / "
        f"{a['paired'][k]['control_only']} | "
        f"{'–' if a['paired'][k]['p'] is None else format(a['paired'][k]['p'], '.3g')} |"
        for k in ("fix", "break"))
    qrows = []
    for q in res["quartiles"]:
        s = q["summary"]
        if s is None:
            continue
        qrows.append(
            f"| Q{q['quartile']} ({q['range'][0]:.3g}–{q['range'][1]:.3g}) | {s['problems']} | "
            f"{s['target']['wrong']} | {s['points_on_wrong']} / {s['points_on_right']} | "
            + " | ".join(_pct(s[b]["fix"]) for b in BRANCHES)
            + f" | {_diff(s['paired']['fix'])} | "
            + " | ".join(_pct(s[b]["break"]) for b in BRANCHES)
            + f" | {_diff(s['paired']['break'])} |")
    qrows_md = "\n".join(qrows)
    head = _header(["branch", "fix rate", "break rate",
                    f"problems fixed (of {a['wrong_with_points']})",
                    f"problems broken (of {a['right_with_points']})"])
    qhead = _header(["quartile", "problems", "target wrong", "points wrong / right",
                     "fix draft", "fix control", "fix diff [CI]", "break draft",
                     "break control", "break diff [CI]"])
    return f"""# The draft's token against a re-roll control, on code

`{res['command']}`

- data: {', '.join(f'`{d}`' for d in res['data'])}{f' ({what})' if what else ''}
- graded in sandbox: {', '.join(res['sandbox'])}
- problems: {a['problems']}; the target's greedy answer right on {a['target']['right']}, \
wrong on {a['target']['wrong']}
- divergence points: {a['points']} on {a['problems_with_points']} problems; \
{a['points_on_wrong']} on target-wrong problems, {a['points_on_right']} on target-right ones
- control token sampled (the draft's token was the target's second choice): \
{a['control_sampled']} points

**Verdict: {res['verdict']}.**

Fix rate: share of points on target-wrong problems whose branch answer is right. Break rate:
share of points on target-right problems whose branch answer is wrong. Brackets: 95 % Wilson
intervals, taking points as independent (they are not: points of a problem share its prompt).

{head}
{rows}

Draft − control over the same points, in percentage points; 95 % intervals from a cluster
bootstrap over problems ({res['resamples']:,} resamples, numpy seed {res['seed']}); exact
two-sided binomial test on the discordant points (points taken as independent):

| rate | draft − control [95 % CI] | discordant: draft only / control only | p |
|---|---|---|---|
{paired}

Per difficulty quartile of the problems with points (Q1 easiest, its range in brackets).
Difficulty (`{res['difficulty']['measure']}`): {res['difficulty']['description']}; it uses
no branch.

{qhead}
{qrows_md}

Verdict rule: "{POSITIVE}" only if the fix-rate difference's bootstrap interval lies
above 0 and the break-rate difference's does not lie above 0; otherwise "{NEGATIVE}".
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="folders of cospec collect's shard-*.jsonl.gz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--difficulty", default="auto", choices=["auto", *DIFFICULTY],
                    help="auto: the first of logprob, length, mismatch_rate the records allow")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = {"command": shlex.join(["python", "scripts/code_control.py", *argv]),
           **analyse(a.dirs, a.difficulty, a.resamples, a.seed)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "code_control.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "code_control.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
