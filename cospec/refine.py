"""``cospec refine``: on-policy refinement of an arbiter over whole generations (GRPO-style).

``cospec train`` learns from single flips on the target's own path (a contextual bandit).
Here the arbiter decides *every* mismatch of whole generations, as it does when decoding:
each iteration takes P training problems and decodes each one G times with the batched
lockstep decoder, the arbiter *sampling* its action at every mismatch (DRAFT with
probability pi(x)). A generation's reward is its grade (1 right, 0 wrong) plus
``speed_bonus`` per draft token kept; its advantage is the reward minus the mean reward of
its group (the G generations of the same problem), so only problems whose generations
disagree carry a gradient. One policy-gradient step then raises the log-probability of
every action taken in a generation in proportion to that generation's advantage:

    loss = -(1 / N) * sum_g A_g * sum_{decisions d of g} log pi(a_d | x_d),  N = decisions

Scalar-feature arbiters only (the lockstep record keeps the features, not hidden states).

Output folder: ``arbiter.safetensors`` (the current policy, usable with ``--arbiter``; its
decision threshold becomes 0.5, the policy's most likely action; its metadata holds the
settings and the history), ``optim.pt`` and ``log.jsonl`` (one line per iteration, rewritten
from that history). All three are replaced atomically after each iteration, so a rerun of
the same command resumes after the last finished iteration; other settings are refused, and
so is an ``--arbiter`` other than the one the run began from (its path and SHA-256 are kept
as ``refine_start`` in the metadata; resuming needs no ``--arbiter``).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cospec.arbiter import LearnedPolicy, arbiter_info, check_pair, load_arbiter, save_arbiter
from cospec.args import (
    changed_settings,
    finite_float,
    in_float32,
    positive_int,
    resolved_dtype,
)
from cospec.assets import write_atomic
from cospec.batched import lockstep
from cospec.collect import require_training_data
from cospec.errors import CospecError, check_writable
from cospec.train import all_finite


@dataclass
class SampledPolicy:
    """A policy whose ``draft_prob`` is a 0/1 draw of Bernoulli(pi(x)): with threshold 0.5
    the lockstep decoder commits the drawn action and records it as ``kept_draft``."""

    policy: LearnedPolicy
    gen: torch.Generator
    needs_hidden: bool = False

    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        return torch.bernoulli(self.policy.draft_prob(features).float(), generator=self.gen)


def advantages(rewards: list[float], group: int) -> list[float]:
    """Reward minus the mean of its group; rewards come in consecutive groups of ``group``."""
    out = []
    for g in range(0, len(rewards), group):
        block = rewards[g:g + group]
        mean = sum(block) / len(block)
        out += [r - mean for r in block]
    return out


def policy_step(policy: LearnedPolicy, opt: torch.optim.Optimizer,
                decisions: list[tuple[list[float], bool, float]]) -> float:
    """One step on (features, kept draft, advantage of its generation) triples; returns the
    loss (0 when there is nothing to learn from)."""
    if not decisions or not any(a for _, _, a in decisions):
        return 0.0
    x = torch.tensor([f for f, _, _ in decisions], dtype=torch.float32)
    act = torch.tensor([float(k) for _, k, _ in decisions])
    adv = torch.tensor([a for _, _, a in decisions])
    policy.train()
    logp = -torch.nn.functional.binary_cross_entropy_with_logits(
        policy.logit(x), act, reduction="none")
    loss = -(adv * logp).sum() / len(decisions)
    if not torch.isfinite(loss):
        raise CospecError("refinement diverged: a non-finite loss; lower --speed-bonus "
                          "or --lr")
    opt.zero_grad()
    loss.backward()
    opt.step()
    policy.eval()
    if not all_finite(policy.parameters()):
        raise CospecError("refinement diverged: the arbiter's weights are no longer finite; "
                          "lower --lr")
    return float(loss.detach())


def recentre(policy: LearnedPolicy, threshold: float) -> None:
    """Shift the output bias by -logit(threshold): afterwards pi(x) >= 0.5 exactly where
    pi(x) >= ``threshold`` before, so the sampled policy starts around the decisions the
    arbiter made at its own threshold (and the refined one is used at 0.5)."""
    with torch.no_grad():
        policy._linears[-1].bias -= torch.logit(torch.tensor(threshold)).item()


def run_iteration(s, policy: LearnedPolicy, opt, idx: list[int], args, it: int) -> dict:
    """Roll out problems ``idx`` of setup ``s`` G times each, grade, take one step."""
    g = args.group
    t0 = time.perf_counter()
    # modulo 2^64: the same generator as the seed itself where torch takes that (in
    # [-2^63, 2^64)), and no overflow for a --seed near 2^63
    gen = torch.Generator().manual_seed((args.seed * 100_003 + it) % 2**64)
    problems = [i for i in idx for _ in range(g)]  # G consecutive generations per problem
    results = lockstep(s.pair.target, s.pair.draft, [s.prompts[i] for i in problems],
                       max_new_tokens=args.max_new_tokens, eos_ids=s.eos, pad_id=s.pad,
                       batch_size=args.batch_size, policy=SampledPolicy(policy, gen),
                       threshold=0.5, record=True, desc=f"refine {it}")
    correct = s.grade([(i, r.tokens) for i, r in zip(problems, results)])
    rewards = [float(ok) + args.speed_bonus * r.overrides for ok, r in zip(correct, results)]
    adv = advantages(rewards, g)
    decisions = [(d.features, d.kept_draft, a) for r, a in zip(results, adv)
                 for d in r.divergences]
    loss = policy_step(policy, opt, decisions)
    kept = sum(k for _, k, _ in decisions)
    return {"iteration": it, "problems": len(idx), "generations": len(results),
            "accuracy": sum(correct) / len(correct), "mean_reward": sum(rewards) / len(rewards),
            "decisions": len(decisions), "keep_rate": kept / max(len(decisions), 1),
            "groups_with_signal": sum(any(adv[j:j + g]) for j in range(0, len(adv), g)),
            "loss": loss, "seconds": time.perf_counter() - t0}


def check_counts(args) -> None:
    """Refuse counts and a step size that make no run (before any model loads)."""
    for name in ("iterations", "problems", "batch_size"):
        if getattr(args, name) < 1:
            raise CospecError(f"--{name.replace('_', '-')} must be >= 1, "
                              f"got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise CospecError(f"--limit must be > 0, got {args.limit}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CospecError(f"--lr must be > 0 (and finite), got {args.lr}")
    if not math.isfinite(args.speed_bonus):
        raise CospecError(f"--speed-bonus must be a finite number, got {args.speed_bonus}")
    if args.group < 2:
        raise CospecError(f"--group must be >= 2 (a group baseline needs two generations), "
                          f"got {args.group}")


def file_sha(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check_start(out: Path, info: dict, arbiter: str | None) -> None:
    """Refuse to resume the refinement in ``out`` (its ``info``) with an ``--arbiter`` other
    than the one it began from (compared by content); none, or the refined file itself,
    resumes. A refinement that predates recording its start is resumed with a note."""
    current = out / "arbiter.safetensors"
    if arbiter is None or Path(arbiter).resolve() == current.resolve():
        return
    arbiter_info(arbiter)  # a missing file or a non-arbiter is named as such
    began = info.get("refine_start")
    if not isinstance(began, dict):
        print(f"note: {out} predates recording the arbiter it began from; it resumes from "
              f"{current}, and --arbiter {arbiter} is not used", file=sys.stderr)
    elif file_sha(arbiter) != began.get("sha256"):
        raise CospecError(f"{out} holds a refinement begun from {began.get('path')} (sha256 "
                          f"{began.get('sha256')}), not from --arbiter {arbiter}; give that "
                          "--arbiter (or none) to resume it, or use another --out")


# settings a refinement records that runs made before lack (not compared for those)
RECORDED_LATER = dict.fromkeys(("k", "no_chat", "dtype"))


def refine_settings(args) -> dict:
    """The settings a refinement records, and a resume must repeat."""
    settings = {k: getattr(args, k) for k in ("task", "split", "limit", "group", "problems",
                                              "lr", "speed_bonus", "max_new_tokens", "seed",
                                              "k", "no_chat")}
    settings["dtype"] = resolved_dtype(args)
    return settings


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """Load the Adam state a refinement saved in ``path`` into ``opt`` (none there: Adam
    starts afresh, the weights resumed); CospecError naming a file that is not one for
    these weights, saying what deleting it does."""
    if not path.exists():
        return
    try:
        opt.load_state_dict(torch.load(path, weights_only=True))
        for w in opt.param_groups[0]["params"]:
            if any(torch.is_tensor(v) and v.dim() and v.shape != w.shape
                   for v in opt.state.get(w, {}).values()):
                raise ValueError("moments of other shapes than the arbiter's weights")
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, KeyError,
            IndexError, TypeError, AttributeError) as err:
        detail = (str(err).splitlines() or [""])[0][:200]
        raise CospecError(f"{path} is not a readable optimizer state ({type(err).__name__}"
                          f"{': ' + detail if detail else ''}); delete it to resume the "
                          f"refinement in {path.parent} with Adam restarted, or use another "
                          "--out to start over") from None


def resume_info(out: Path, args, settings: dict) -> dict:
    """The info of the refinement in ``out`` to resume; refused when it ran with other
    settings (each named) or began from another arbiter than ``--arbiter``."""
    info = json.loads(arbiter_info(out / "arbiter.safetensors")["info"])
    old = info.get("refine_settings", {})
    diff = list(changed_settings(old, settings, settings, RECORDED_LATER))
    if diff:
        raise CospecError(f"{out} holds a refinement with other settings "
                          f"({', '.join(diff)}); use another --out")
    check_start(out, info, args.arbiter)
    return info


def cmd_refine(args) -> int:
    from cospec.eval_setup import EvalSetup

    require_training_data(args, "refine")  # greedy: the arbiter's actions are the randomness
    check_counts(args)
    out = Path(args.out)
    check_writable(out, f"--out {out}")  # made once every check has passed
    current = out / "arbiter.safetensors"
    settings = refine_settings(args)
    resuming = current.exists()
    if resuming:
        start, info = current, resume_info(out, args, settings)
    elif args.arbiter is None:
        raise CospecError("refine starts from an arbiter: give --arbiter PATH (e.g. one made "
                          "by cospec train)")
    else:
        start, info = Path(args.arbiter), json.loads(arbiter_info(args.arbiter)["info"])
        info["refine_start"] = {"path": str(args.arbiter), "sha256": file_sha(args.arbiter)}
    policy = load_arbiter(start)  # its pair is checked once the models name theirs
    if policy.needs_hidden:
        raise CospecError(f"{start} uses hidden states; refine trains scalar-feature arbiters")
    history = info.get("refine_history", []) if resuming else []
    if not resuming:
        recentre(policy, policy.threshold)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    if resuming:
        load_optimizer(opt, out / "optim.pt")  # before minutes of model loading
    s = EvalSetup(args, ["target", "draft"])
    pair = (s.pair.target_name, s.pair.draft_name)
    check_pair(start, pair)
    if resuming and args.arbiter:  # where the start is not recorded, its pair at least
        check_pair(args.arbiter, pair)
    out.mkdir(parents=True, exist_ok=True)
    n = len(s.problems)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    for it in range(len(history), args.iterations):
        idx = [order[(it * args.problems + j) % n] for j in range(min(args.problems, n))]
        row = run_iteration(s, policy, opt, idx, args, it)
        history.append(row)
        print(json.dumps(row), flush=True)
        info.update(threshold=0.5, refine_history=history, refine_settings=settings)
        write_atomic(out / "optim.pt", lambda p: torch.save(opt.state_dict(), p))
        write_atomic(current, lambda p: save_arbiter(policy, p, pair, info))
        write_atomic(out / "log.jsonl",
                     lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in history)))
    print(f"{len(history)} iterations in {out}; decode with --arbiter {current}")
    return 0


def add_parser(sub, add_model_args, add_decoding_args) -> None:
    p = sub.add_parser("refine", help="on-policy refinement of an arbiter (whole generations, "
                                      "group baseline)")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N problems")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--problems", type=int, default=64, help="problems per iteration")
    p.add_argument("--group", type=int, default=4, help="generations per problem")
    p.add_argument("--lr", type=in_float32(finite_float), default=0.02,
                   help="Adam step size (0.02: the H100 run of results/gpu/refine-gsm8k-dev)")
    p.add_argument("--speed-bonus", type=in_float32(finite_float), default=0.0,
                   help="reward per draft token kept, added to the grade")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_refine)
