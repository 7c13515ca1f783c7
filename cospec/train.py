"""``cospec train``: fit the arbiter with policy gradient on collected divergence points.

Each point x has counterfactual rewards r_D (the draft branch's answer was right) and r_T
(the target's). The policy pi(DRAFT | x) is trained with REINFORCE: sample an action, reward
it (plus ``speed_bonus`` for keeping the draft token), and subtract a group baseline — the
mean reward of the point's two branches, GRPO-style. Points where both branches agree carry
no advantage (bar the speed bonus) and so no gradient: the policy learns where the draft's
token changes the outcome.

Evaluation on held-out *problems* (not just points): oracle agreement on decisive points
(r_D != r_T), the single-flip gain sum((r_D - r_T) * [pi >= threshold]), and the threshold
that maximises that gain on the validation points.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from cospec.arbiter import FEATURES, LearnedPolicy, save_arbiter
from cospec.args import (
    finite_float,
    in_float32,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
    unit_closed,
)
from cospec.collect import read_points, shard_files
from cospec.errors import CospecError, check_writable, read_json


def open_unit(text: str) -> float:
    """An argparse type: a finite number strictly between 0 and 1 (``--val-fraction``)."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def data_pair(paths: list[str]) -> tuple[str, str] | None:
    """The (target, draft) pair that the collect folders ``paths`` name in their meta.json
    (a shard file: its folder's), or None where none has one. Folders of different pairs
    are refused (compared by file name, as ``load_arbiter`` compares pairs): their features
    come from other models, and the arbiter would carry only the first pair's name."""
    pairs: dict[tuple[str, str], tuple[tuple[str, str], Path]] = {}
    for d in map(Path, paths):
        meta_file = (d if d.is_dir() else d.parent) / "meta.json"
        if not meta_file.is_file():
            continue
        meta = read_json(meta_file)
        if not isinstance(meta, dict) or not all(
                isinstance(meta.get(k), str) and meta[k] for k in ("target", "draft")):
            raise CospecError(f"{meta_file} does not name the model pair (target, draft) "
                              "as cospec collect writes it")
        pair = (meta["target"], meta["draft"])
        pairs.setdefault((Path(pair[0]).name, Path(pair[1]).name), (pair, meta_file))
    if len(pairs) > 1:
        (a, fa), (b, fb) = list(pairs.values())[:2]
        raise CospecError(f"--data mixes model pairs: {fa} is target {a[0]} / draft {a[1]}, "
                          f"{fb} is target {b[0]} / draft {b[1]}; train one arbiter per pair")
    return next(iter(pairs.values()))[0] if pairs else None


def report_path(out: str) -> Path:
    """Where the training report goes beside the arbiter file ``out`` (its name with
    ``.json``); refuses an ``out`` that is a folder, one ending in .json, whose report
    would overwrite the arbiter, and one of another kind than .safetensors (or no suffix)."""
    arb = Path(out)
    if arb.is_dir():
        raise CospecError(f"--out {out} is a folder: name the arbiter file to write "
                          "(e.g. arbiter.safetensors)")
    if arb.suffix.lower() == ".json":
        raise CospecError(f"--out {out}: the arbiter's report is written beside it as .json; "
                          "name the arbiter file otherwise (e.g. .safetensors)")
    if arb.suffix.lower() not in ("", ".safetensors"):  # nor overwrite another kind of file
        raise CospecError(f"--out {out}: an arbiter is a safetensors file; name it "
                          f"{arb.with_suffix('.safetensors').name}")
    report = arb.with_suffix(".json")
    if report.is_dir():
        raise CospecError(f"the report {report} for --out {out} would overwrite a folder")
    return report


def model_pair(args) -> tuple[str, str]:
    """The (target, draft) the arbiter is recorded for: the pair the data's meta.json names,
    which ``--target`` and ``--draft`` (optional there) must not contradict (compared by file
    name, as ``load_arbiter`` compares pairs); data without one needs both flags."""
    pair = data_pair(args.data)
    if pair:
        for role, given, collected in (("target", args.target, pair[0]),
                                       ("draft", args.draft, pair[1])):
            if given and Path(given).name != Path(collected).name:
                raise CospecError(f"--{role} {given} contradicts --data, collected with {role} "
                                  f"{collected}; drop --{role} (the data names its models) or "
                                  f"train on data collected with {given}")
    target = args.target or (pair[0] if pair else None)
    draft = args.draft or (pair[1] if pair else None)
    if not target or not draft:
        raise CospecError("cannot tell which model pair the data is from: give --target/--draft")
    return target, draft


def split_by_problem(points: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of the problem id, so no problem is on both sides.

    The hash is salted: GSM8K's dev split is itself chosen by an unsalted hash of the id,
    and reusing that hash would put a correlated, not random, share of dev into validation.
    """
    def is_val(pid: str) -> bool:
        h = int(hashlib.sha256(f"arbiter-val:{pid}".encode()).hexdigest()[:8], 16)
        return h % 1000 < 1000 * val_fraction
    train = [p for p in points if not is_val(p["id"])]
    val = [p for p in points if is_val(p["id"])]
    return train, val


def tensors(points: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.tensor([p["features"] for p in points], dtype=torch.float32)
    r_d = torch.tensor([float(p["draft_correct"]) for p in points])
    r_t = torch.tensor([float(p["target_correct"]) for p in points])
    return x, r_d, r_t


def evaluate_policy(policy: LearnedPolicy, points: list[dict], threshold: float) -> dict:
    """Oracle agreement and single-flip gain of ``policy`` on ``points``."""
    x, r_d, r_t = tensors(points)
    with torch.no_grad():
        keep = torch.sigmoid(policy.logit(x)) >= threshold
    decisive = r_d != r_t
    oracle = r_d > r_t
    agree = (keep == oracle)[decisive].float().mean().item() if decisive.any() else float("nan")
    return {"points": len(points), "decisive": int(decisive.sum()),
            "draft_better": int(oracle.sum()), "target_better": int((r_t > r_d).sum()),
            "oracle_agreement": agree,
            "always_target_agreement": (~oracle)[decisive].float().mean().item()
            if decisive.any() else float("nan"),
            "keep_rate": keep.float().mean().item(),
            "single_flip_gain": ((r_d - r_t) * keep.float()).sum().item()}


def oracle_ceiling(points: list[dict]) -> dict:
    """Single-flip oracle over the collected points: a problem counts as solved if the
    target's answer is right or the draft branch at some collected point is right."""
    by_problem: dict[str, list[dict]] = {}
    for p in points:
        by_problem.setdefault(p["id"], []).append(p)
    target = sum(ps[0]["target_correct"] for ps in by_problem.values())
    oracle = sum(ps[0]["target_correct"] or any(p["draft_correct"] for p in ps)
                 for ps in by_problem.values())
    n = len(by_problem)
    return {"problems_with_points": n, "target_accuracy": target / n if n else None,
            "single_flip_oracle_accuracy": oracle / n if n else None}


def best_threshold(policy: LearnedPolicy, points: list[dict]) -> float:
    """The threshold in [0.5, 0.99] with the largest single-flip gain (ties: the highest)."""
    best, best_gain = 0.99, 0.0
    for th in [0.5 + 0.01 * i for i in range(50)]:
        gain = evaluate_policy(policy, points, th)["single_flip_gain"]
        if gain >= best_gain and gain > 0:
            best, best_gain = th, gain
    return best


def diverged(epoch: int, what: str, lr: float, speed_bonus: float,
             lower: str | None = None) -> CospecError:
    """The error for a training whose numbers stopped being finite in ``epoch`` (``what``
    did), naming the flag to lower: ``lower``, else the one past its usual scale (a step size
    above 1, a bonus larger than the 0/1 rewards), else both."""
    flags = [f for f, big in (("--lr", lr > 1), ("--speed-bonus", abs(speed_bonus) > 1)) if big]
    lower = lower or " or ".join(flags or ["--lr", "--speed-bonus"])
    return CospecError(f"training diverged in epoch {epoch + 1}: {what} (--lr {lr:g}, "
                       f"--speed-bonus {speed_bonus:g}); lower {lower}")


def all_finite(tensors) -> bool:
    """Whether every element of every tensor of ``tensors`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def reinforce(points: list[dict], *, epochs: int = 300, lr: float = 3e-3,
              hidden_units: int = 32, speed_bonus: float = 0.0, seed: int = 0,
              batch: int = 256) -> LearnedPolicy:
    """REINFORCE with a two-branch group baseline on the bandit data. A step size or bonus
    too large for float32 stops it with a CospecError (``diverged``): each batch's logits
    and, after each epoch, the weights and Adam's moments must stay finite (moments that
    overflow stop the learning without a word)."""
    torch.manual_seed(seed)
    x, r_d, r_t = tensors(points)
    policy = LearnedPolicy(len(FEATURES), None, hidden_units)
    policy.mean.copy_(x.mean(0))
    policy.std.copy_(x.std(0).clamp_min(1e-3))
    opt = torch.optim.Adam(policy.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    baseline = (r_d + speed_bonus + r_t) / 2
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            logit = policy.logit(x[idx])
            if not all_finite([logit]):
                raise diverged(epoch, "the policy's logits are no longer finite", lr,
                               speed_bonus)
            p = torch.sigmoid(logit)
            action = torch.bernoulli(p.detach(), generator=gen)   # 1 = DRAFT
            reward = torch.where(action.bool(), r_d[idx] + speed_bonus, r_t[idx])
            logp = -torch.nn.functional.binary_cross_entropy_with_logits(
                logit, action, reduction="none")
            loss = -((reward - baseline[idx]) * logp).mean()
            opt.zero_grad()
            loss.backward()
            try:
                opt.step()
            except RuntimeError as err:  # lr / (1 - beta1^t) past float32's range
                if "overflow" not in str(err):
                    raise
                raise diverged(epoch, "Adam's step size overflows float32", lr, speed_bonus,
                               "--lr") from None
        moments = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        if not all_finite([*policy.parameters(), *moments]):
            raise diverged(epoch, "the weights or Adam's moments are no longer finite", lr,
                           speed_bonus)
    return policy.eval()


def cmd_train(args) -> int:
    report_file = report_path(args.out)  # before the data is read and the policy trained
    check_writable(Path(args.out).parent, f"--out {args.out}")
    files = shard_files(args.data)  # a missing path is named before the pair is looked for
    target, draft = model_pair(args)
    points = read_points(files)
    train, val = split_by_problem(points, args.val_fraction)
    if not train or not val:
        raise CospecError(f"too few problems to split with --val-fraction {args.val_fraction} "
                          f"({len({p['id'] for p in points})} problems, {len(points)} points: "
                          f"{len(train)} to train on, {len(val)} to validate on)")
    policy = reinforce(train, epochs=args.epochs, lr=args.lr, hidden_units=args.hidden_units,
                       speed_bonus=args.speed_bonus, seed=args.seed)
    threshold = best_threshold(policy, val) if args.threshold is None else args.threshold
    report = {"threshold": threshold,
              "train": evaluate_policy(policy, train, threshold),
              "val": evaluate_policy(policy, val, threshold),
              "oracle": oracle_ceiling(points),
              "settings": {k: getattr(args, k) for k in
                           ("epochs", "lr", "hidden_units", "speed_bonus", "seed",
                            "val_fraction")},
              "data": [str(d) for d in args.data]}
    save_arbiter(policy, args.out, (target, draft), report)
    report_file.write_text(json.dumps(report, indent=1))
    v = report["val"]
    print(f"arbiter -> {args.out} (report {report_file}, threshold {threshold:.2f}); "
          f"held-out problems: "
          f"{v['points']} points, {v['decisive']} decisive, oracle agreement "
          f"{v['oracle_agreement']:.1%} (always-TARGET {v['always_target_agreement']:.1%}), "
          f"keep rate {v['keep_rate']:.1%}, single-flip gain {v['single_flip_gain']:+.0f}; "
          f"oracle ceiling {report['oracle']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the CoSpec arbiter on collected divergences")
    p.add_argument("--data", nargs="+", required=True, help="folders made by cospec collect")
    p.add_argument("--out", required=True,
                   help="arbiter file to write (.safetensors); its report goes beside it, "
                        "named with .json")
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--lr", type=in_float32(positive_float), default=3e-3)
    p.add_argument("--hidden-units", type=nonneg_int, default=32, help="0: a linear policy")
    p.add_argument("--speed-bonus", type=in_float32(finite_float), default=0.0,
                   help="reward added for keeping the draft token")
    p.add_argument("--threshold", type=unit_closed, default=None,
                   help="decision threshold stored in the report (default: tuned on val)")
    p.add_argument("--val-fraction", type=open_unit, default=0.2,
                   help="share of the problems held out for validation, in (0, 1)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--target", default=None,
                   help="the target the data is from (default: its meta.json's, which a "
                        "value given must agree with)")
    p.add_argument("--draft", default=None,
                   help="the draft the data is from (default: its meta.json's, likewise)")
    p.set_defaults(func=cmd_train)
