"""How much can an arbiter gain on this pair if a flip is a re-roll? A bound from the data.

    python scripts/reroll_bound.py [--data data/divergences-gsm8k-dev] [--out results/cospec]

The collected divergence points (both branches rolled out and graded) say that keeping the
draft's token fixes a wrongly answered problem at a rate f and breaks a rightly answered one
at a rate b, and that no feature at the point tells which (results/cospec/README.md). If so,
*where* to flip does not matter, only *whether* the target's trajectory is going wrong: an
arbiter that flips once per problem, when a predictor of the target's final correctness
says "wrong", gains

    gain = w f TPR - (1 - w) b FPR        (w: fraction of problems the target gets wrong)

at the predictor's best operating point. For a predictor of AUC A (binormal, equal
variances: TPR = Phi(d - z), FPR = Phi(-z), A = Phi(d / sqrt 2)) this is a curve in A; the
script writes it with f, b and w measured (cluster-bootstrap intervals by problem), the AUC
a +1.7 / +4 point gain would need, and the perfect predictor's single-flip gain w f.

That bound takes f and b as constants. They are not: stratified by how often the draft and
target disagree along the target's path (a proxy for difficulty, and itself a predictor of
the target being wrong), f falls and b rises on hard problems. The script also measures
the single flip gated by that predictor directly (flip iff the problem's mismatch count is
at least a threshold; the flip's outcome averaged over the problem's collected points).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

PROBE_AUC = 0.72  # target-hidden-state probe of the target's own correctness (hidden-probe.md)


def load(folder: Path) -> tuple[dict[str, bool], dict[str, list[bool]], dict[str, int]]:
    """(target correct per problem, draft-branch correct per point of each problem, the
    mismatch count along the target's path per problem)."""
    target, points, mismatches = {}, {}, {}
    for shard in sorted(folder.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt") as fh:
            for line in fh:
                row = json.loads(line)
                if "position" in row:
                    points.setdefault(row["id"], []).append(bool(row["draft_correct"]))
                elif "target_correct" in row:
                    target[row["id"]] = bool(row["target_correct"])
                    mismatches[row["id"]] = int(row["mismatches"])
    return target, points, mismatches


def auc(score: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    from scipy.stats import mannwhitneyu

    x, y = np.asarray(score, float), np.asarray(positive, bool)
    return float(mannwhitneyu(x[y], x[~y]).statistic / (y.sum() * (~y).sum()))


def gate_curve(target, points, mismatches, ids) -> list[tuple[int, int, float]]:
    """(threshold, problems flipped, net gain over all ``ids``) of one flip per problem whose
    mismatch count >= threshold; a flip fixes a wrong problem / breaks a right one at the
    rate measured over that problem's points."""
    value = {i: (np.mean(points[i]) if not target[i] else np.mean(points[i]) - 1)
             for i in ids if points.get(i)}
    out = []
    for th in sorted({0, *range(10, 61, 5)}):
        sel = [i for i in value if mismatches[i] >= th]
        out.append((th, len(sel), sum(value[i] for i in sel) / len(ids)))
    return out


def rates(target: dict[str, bool], points: dict[str, list[bool]], ids: list[str]
          ) -> tuple[float, float, float]:
    """(w, f, b) over the problems ``ids`` (with repeats, for the bootstrap)."""
    wrong = [i for i in ids if not target[i]]
    right = [i for i in ids if target[i]]
    fixes = sum(sum(points.get(i, [])) for i in wrong)
    breaks = sum(len(points.get(i, [])) - sum(points.get(i, [])) for i in right)
    return (len(wrong) / len(ids), fixes / max(1, sum(len(points.get(i, [])) for i in wrong)),
            breaks / max(1, sum(len(points.get(i, [])) for i in right)))


def best_gain(auc: float, w: float, f: float, b: float) -> float:
    """Max over thresholds of w f TPR - (1 - w) b FPR for a binormal predictor of ``auc``."""
    d = np.sqrt(2) * norm.ppf(auc)
    z = np.linspace(-6, 8, 4001)
    return float(max(0.0, np.max(w * f * norm.cdf(d - z) - (1 - w) * b * norm.cdf(-z))))


def needed_auc(goal: float, w: float, f: float, b: float) -> float | None:
    """The AUC at which the best gain reaches ``goal`` (None if even AUC 1 cannot)."""
    if best_gain(0.99999, w, f, b) < goal:
        return None
    return brentq(lambda a: best_gain(a, w, f, b) - goal, 0.5 + 1e-6, 0.99999)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/divergences-gsm8k-dev")
    ap.add_argument("--out", default="results/cospec")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()
    target, points, mismatches = load(Path(args.data))
    ids = sorted(target)
    w, f, b = rates(target, points, ids)
    counts = [mismatches[i] for i in ids]
    quart = np.quantile(counts, [0.25, 0.5, 0.75])
    strata = []
    for q in range(4):
        lo, hi = (-1, *quart, np.inf)[q], (-1, *quart, np.inf)[q + 1]
        sel = [i for i in ids if lo < mismatches[i] <= hi]
        sw, sf, sb = rates(target, points, sel)
        strata.append({"quartile": q + 1, "mismatches": [int(lo) + 1, hi], "problems": len(sel),
                       "w": sw, "f": sf, "b": sb, "single_flip_gain": sw * sf - (1 - sw) * sb})
    gate = gate_curve(target, points, mismatches, ids)
    gate_auc = auc(counts, [not target[i] for i in ids])
    rng = np.random.default_rng(0)
    boot = np.array([rates(target, points, list(rng.choice(ids, len(ids))))
                     for _ in range(args.bootstrap)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    aucs = np.linspace(0.5, 0.999, 200)
    curve = [best_gain(a, w, f, b) for a in aucs]
    res = {
        "data": args.data, "problems": len(ids), "points": sum(map(len, points.values())),
        "w_target_wrong": w, "f_fix_rate": f, "b_break_rate": b,
        "ci95": {"w": [lo[0], hi[0]], "f": [lo[1], hi[1]], "b": [lo[2], hi[2]]},
        "gain_at_probe_auc": best_gain(PROBE_AUC, w, f, b),
        "gain_at_probe_auc_ci95": list(np.percentile(
            [best_gain(PROBE_AUC, *x) for x in boot[:400]], [2.5, 97.5])),
        "gain_perfect_predictor_one_flip": w * f,
        "auc_needed": {str(g): needed_auc(g, w, f, b) for g in (0.017, 0.04)},
        "strata_by_mismatch_count": strata,
        "mismatch_count_auc_for_target_wrong": gate_auc,
        "gate_by_mismatch_count": [{"threshold": t, "flipped": n, "gain": g}
                                   for t, n, g in gate],
        "command": "python scripts/reroll_bound.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reroll-bound.json").write_text(json.dumps(res, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(aucs, 100 * np.array(curve), label="best single-flip gain (f, b constant)")
    for goal, name in ((1.7, "+1.7 (paper)"), (4.0, "+4 (goal)")):
        ax.axhline(goal, ls="--", lw=0.8, color="gray")
        ax.text(0.505, goal + 0.1, name, fontsize=8, color="gray")
    ax.axvline(PROBE_AUC, ls=":", color="C3")
    ax.text(PROBE_AUC + 0.005, 3.2, "hidden-state probe", fontsize=8, color="C3")
    best_gate = max(gate, key=lambda x: x[2])
    ax.plot([gate_auc], [100 * best_gate[2]], "o", color="C1",
            label="measured: gate on the mismatch count (best threshold)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, 0.9))
    ax.set_xlabel("AUC of a mid-generation predictor of the target's final correctness")
    ax.set_ylabel("accuracy gain over target (points)")
    ax.set_title("GSM8K dev, if a flip is a re-roll", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "reroll-bound.png", dpi=120)

    ci = res["ci95"]
    strata_rows = "\n".join(
        f"| Q{x['quartile']} ({x['mismatches'][0]}–"
        f"{'' if x['mismatches'][1] == np.inf else int(x['mismatches'][1])}) | {x['problems']} | "
        f"{100 * x['w']:.0f} % | {100 * x['f']:.1f} % | {100 * x['b']:.1f} % | "
        f"{100 * x['single_flip_gain']:+.1f} |" for x in strata)
    gate_rows = "\n".join(f"| ≥ {t} | {n} | {100 * g:+.2f} |" for t, n, g in gate)
    rate_rows = "\n".join(
        f"| {name} | {100 * v:.1f} % | [{100 * ci[k][0]:.1f}, {100 * ci[k][1]:.1f}] |"
        for k, v, name in (("w", w, "w: problems the target gets wrong"),
                           ("f", f, "f: a flip at a point of a wrong problem fixes it"),
                           ("b", b, "b: a flip at a point of a right problem breaks it")))
    res["strata_by_mismatch_count"] = [x | {"mismatches": [x["mismatches"][0], str(
        x["mismatches"][1])]} for x in strata]
    (out / "reroll-bound.json").write_text(json.dumps(res, indent=1))
    need = {g: res["auc_needed"][str(g)] for g in (0.017, 0.04)}
    fmt = {g: f"{a:.3f}" if a is not None else "unreachable" for g, a in need.items()}
    md = f"""# If a flip is a re-roll: what any arbiter can gain on this pair

Data: `{args.data}` ({res['problems']} GSM8K dev problems, {res['points']} divergence points,
the first 6 per problem, both branches rolled out by the target and graded). Command:
`{res['command']}`.

| quantity | value | 95% interval (bootstrap by problem) |
|---|---|---|
{rate_rows}

No feature at a point separates the flips that fix from those that break (AUC 0.45–0.54,
[hidden-probe.md](hidden-probe.md)), so an arbiter's only lever is *whether* to flip: when
the trajectory looks wrong. One flip per problem, chosen by a predictor of the target's
final correctness with AUC A (binormal), gains at best w·f·TPR − (1 − w)·b·FPR:

![gain vs AUC](reroll-bound.png)

- At the AUC of the best predictor found (the target's hidden state, problem-level AUC
  {PROBE_AUC}): **{100 * res['gain_at_probe_auc']:+.1f} points** (95 % interval
  [{100 * res['gain_at_probe_auc_ci95'][0]:+.1f}, {100 * res['gain_at_probe_auc_ci95'][1]:+.1f}]).
- The paper's +1.7 needs AUC **{fmt[0.017]}**; the +4 goal needs AUC **{fmt[0.04]}**.
- A perfect predictor with one flip: +{100 * w * f:.1f} points (w·f). The single-flip oracle
  on the same data (63.9 % → 80.9 %) chooses the point in hindsight among six re-rolls.

That bound is optimistic: it takes f and b as constants. Stratified by the number of
draft/target mismatches along the target's path (a proxy for difficulty):

| quartile (mismatches) | problems | target wrong | f (fix) | b (break) | one flip each, points |
|---|---|---|---|---|---|
{strata_rows}

On hard problems a flip breaks a right answer more often than it fixes a wrong one: the
target's right answers there are fragile. And a predictor of "the target is wrong" as good
as the hidden-state probe needs no hidden states: the mismatch count alone has AUC
**{gate_auc:.2f}** (it measures difficulty; the probe may well do the same). One flip per
problem gated on it (flip iff the count ≥ threshold — a count known only at the end of the
generation, which a running gate could only approximate) gains, in points over all
{res['problems']} problems:

| gate | problems flipped | gain (points) |
|---|---|---|
{gate_rows}

The best is **{100 * best_gate[2]:+.2f}** (orange dot in the plot), not the curve's
+{100 * best_gain(gate_auc, w, f, b):.1f} at that AUC.

So on this pair neither token-level nor trajectory-level signals give the arbiter a lever:
what predicts the target's failures is difficulty, and on difficult problems re-rolling
hurts. +4 points would need a predictor of the target's *mistakes* (an arithmetic slip, not
a hard problem) with an AUC above {fmt[0.04]}, or a draft that is right for token-level
reasons where the target is wrong.
"""
    (out / "reroll-bound.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
