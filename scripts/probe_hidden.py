"""Do hidden states tell when to keep the draft's token? (analysis behind results/cospec/)

Reads the output of scripts/hidden_at_points.py: the target's hidden states at the collected
GSM8K-dev divergence points, and at every few generated positions of each target trajectory
with the problem's label (was the target's final answer right?). Fits a linear correctness
probe (standardise -> PCA -> logistic regression) on the training problems of the arbiter
split (cospec.train.split_by_problem, 30% validation) and reports on the validation problems:

- row / problem AUC of the probe for "the target's answer is right";
- AUC at the divergence points, and AUC for "the draft branch is right" among decisive
  points (r_D != r_T), scoring with 1 - P(target right);
- the single-flip gain of a budget-1 gate: keep the draft token at the first divergence point
  of a problem where P(target right) < tau; gain = fixed - broken problems (out of flips).

Writes a Markdown table. Needs scikit-learn.

    python scripts/probe_hidden.py HIDDEN_DIR --out results/cospec/hidden-probe.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cospec.arbiter import FEATURES
from cospec.collect import read_points
from cospec.train import split_by_problem

TAUS = (0.2, 0.3, 0.4, 0.5, 0.6)


def gate_gain(points: list[dict], scores: np.ndarray, tau: float) -> tuple[int, int]:
    """(fixed - broken, flips) of keeping the draft at each problem's first point < tau."""
    first: dict[str, tuple[int, dict]] = {}
    for p, s in zip(points, scores):
        if s < tau and (p["id"] not in first or p["position"] < first[p["id"]][0]):
            first[p["id"]] = (p["position"], p)
    gain = sum(int(p["draft_correct"]) - int(p["target_correct"]) for _, p in first.values())
    return gain, len(first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hidden", help="output folder of scripts/hidden_at_points.py")
    ap.add_argument("--data", default="data/divergences-gsm8k-dev")
    ap.add_argument("--out", default=None, help="Markdown file for the table")
    a = ap.parse_args()
    points = read_points([a.data])
    pt = load_file(f"{a.hidden}/points.safetensors")
    pr = load_file(f"{a.hidden}/probe.safetensors")
    problems = json.loads(Path(a.hidden, "info.json").read_text())["problems"]
    valid = pt["valid"].numpy()
    th = pt["target_hidden"].float().numpy()
    for n, p in enumerate(points):
        p["n"] = n
    train, val = split_by_problem(points, 0.3)
    train_ids, val_ids = {p["id"] for p in train}, {p["id"] for p in val}
    qh, qy = pr["hidden"].float().numpy(), pr["label"].numpy()
    qp = pr["problem"].numpy()
    tr_rows = np.array([problems[i] in train_ids for i in qp])
    va_rows = np.array([problems[i] in val_ids for i in qp])
    vp = [p for p in val if valid[p["n"]]]
    lines = [f"probe rows: {int(tr_rows.sum())} train / {int(va_rows.sum())} val; "
             f"validation problems {len(val_ids)}, divergence points {len(vp)} "
             f"({int(valid.sum())}/{len(points)} points matched the recomputed trajectories)",
             "", "| C | PCA | row AUC | problem AUC | point AUC | decisive AUC (draft right) | "
             + " | ".join(f"gate τ={t}" for t in TAUS) + " |",
             "|---" * (6 + len(TAUS)) + "|"]
    for c in (0.001, 0.01, 0.1):
        for comps in (32, 128):
            probe = make_pipeline(StandardScaler(), PCA(comps, random_state=0),
                                  LogisticRegression(C=c, max_iter=2000))
            probe.fit(qh[tr_rows], qy[tr_rows])
            s = probe.predict_proba(qh[va_rows])[:, 1]
            pv, yv = qp[va_rows], qy[va_rows]
            per = {i: s[pv == i].mean() for i in np.unique(pv)}
            prob_auc = roc_auc_score([yv[pv == i][0] for i in per], list(per.values()))
            sp = probe.predict_proba(th[[p["n"] for p in vp]])[:, 1]
            pts_auc = roc_auc_score([p["target_correct"] for p in vp], sp)
            dec = [(p, x) for p, x in zip(vp, sp) if p["draft_correct"] != p["target_correct"]]
            dec_auc = roc_auc_score([p["draft_correct"] for p, _ in dec], [-x for _, x in dec])
            gates = [gate_gain(vp, sp, t) for t in TAUS]
            lines.append(f"| {c} | {comps} | {roc_auc_score(yv, s):.3f} | {prob_auc:.3f} | "
                         f"{pts_auc:.3f} | {dec_auc:.3f} | "
                         + " | ".join(f"{g:+d}/{f}" for g, f in gates) + " |")
    lines += ["", "Scalar arbiter features alone, all decisive points "
              "(AUC for 'the draft branch is right'; 0.5 = no signal):", "",
              "| feature | AUC |", "|---|---|"]
    dec_all = [p for p in points if p["draft_correct"] != p["target_correct"]]
    for j, name in enumerate(FEATURES):
        auc = roc_auc_score([p["draft_correct"] for p in dec_all],
                            [p["features"][j] for p in dec_all])
        lines.append(f"| {name} | {auc:.3f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
