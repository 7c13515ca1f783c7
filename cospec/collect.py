"""``cospec collect``: divergence points with both branches rolled out and graded.

For each training prompt the target decodes greedily (lockstep with the draft, so every
position where the draft's greedy token differs is recorded with its features). That
target-only trajectory *is* the TARGET branch of every divergence point on it, graded once
per prompt. For the DRAFT branch of a point, the draft's token is committed there and the
target continues greedily (batched across points). Each point thus gets counterfactual
rewards for both actions: a contextual bandit with full information. A third, CONTROL
branch commits a token the draft did not propose (the target's second choice, or a T = 1
sample of the target when the draft's token is its second choice): if flipping to the draft's
token fixes wrong answers no more often than this re-roll does, the draft carries no
information an arbiter could learn.

Output: ``OUT/shard-NNNN.jsonl.gz``, one per ``--shard-size`` problems, written atomically,
so an interrupted run resumes at the first missing shard and never duplicates a point.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

from tqdm import tqdm

from cospec.batched import lockstep
from cospec.errors import CospecError, read_json

TRAIN_SPLITS = {"gsm8k": ("dev",), "math500": ("train", "all"), "mbpp": ("dev",)}


def shard_files(paths: list[str | Path]) -> list[Path]:
    """The shard files named, or found in the folders named (``shard-*.jsonl.gz``, sorted);
    a shard holds a ``shard_seconds`` header line, then one record per problem (the target's
    path graded) and one per divergence point (with ``position``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("shard-*.jsonl.gz"))
        elif p.is_file():
            files.append(p)
        else:
            raise CospecError(f"no divergence data at {p}")
    if not files:
        raise CospecError(f"no shard-*.jsonl.gz files in {', '.join(map(str, paths))}")
    return files


def read_points(paths: list[str | Path]) -> list[dict]:
    """All divergence records of the given shard files or folders."""
    out = []
    for f in shard_files(paths):
        with gzip.open(f, "rt") as fh:
            out += [json.loads(line) for line in fh if '"position"' in line]
    return out


def _rollouts(s, prompts: list[list[int]], paths, branches, batch_size: int
              ) -> list[list[int]]:
    """Generated tokens of each branch ``(j, divergence, token)``: row j's target path up to
    the point, ``token`` there, then the target greedily to the budget (one batched run)."""
    a = s.args
    heads = [paths[j].tokens[:d.position] + [tok] for j, d, tok in branches]
    budgets = [a.max_new_tokens - d.position - 1 for _, d, _ in branches]
    live = [n for n, (b, h) in enumerate(zip(budgets, heads)) if b > 0 and h[-1] not in s.eos]
    rolled = lockstep(s.pair.target, None, [prompts[branches[n][0]] + heads[n] for n in live],
                      max_new_tokens=[budgets[n] for n in live], eos_ids=s.eos, pad_id=s.pad,
                      batch_size=batch_size) if live else []
    tails = dict(zip(live, (r.tokens for r in rolled)))
    return [h + tails.get(n, []) for n, h in enumerate(heads)]


def collect_shard(s, idx: list[int], max_points: int, batch_size: int) -> list[dict]:
    """Records for problems ``idx`` of setup ``s`` (see module doc): one per problem (the
    target's path, graded, and ``target_logprob``, the target's summed log-probability of
    it) and one per divergence point with its DRAFT and CONTROL branches
    (``batched.control_tokens``) rolled out and graded. Branch records keep their tokens
    after the point so they can be regraded."""
    a = s.args
    prompts = [s.prompts[i] for i in idx]
    paths = lockstep(s.pair.target, s.pair.draft, prompts, max_new_tokens=a.max_new_tokens,
                     eos_ids=s.eos, pad_id=s.pad, batch_size=batch_size, record=True)
    target_ok = s.grade([(i, r.tokens) for i, r in zip(idx, paths)])
    points = [(j, d) for j, r in enumerate(paths) for d in r.divergences[:max_points]]
    branches = [(j, d, d.d) for j, d in points] + [(j, d, d.c) for j, d in points]
    outs = _rollouts(s, prompts, paths, branches, batch_size)
    branch_ok = s.grade([(idx[j], toks) for (j, _, _), toks in zip(branches, outs)])
    drafts, controls = outs[:len(points)], outs[len(points):]
    draft_ok, control_ok = branch_ok[:len(points)], branch_ok[len(points):]
    recs = [{"id": s.problems[i].id, "target_correct": ok, "tokens": len(r.tokens),
             "mismatches": r.mismatches, "target_ids": r.tokens,
             "target_logprob": round(r.logprob, 4), **s.grader()}
            for i, r, ok in zip(idx, paths, target_ok)]
    for n, (j, d) in enumerate(points):
        recs.append({"id": s.problems[idx[j]].id, "position": d.position, "t": d.t, "d": d.d,
                     "c": d.c, "c_sampled": d.c_sampled,
                     "features": [round(x, 5) for x in d.features],
                     "target_correct": target_ok[j], "draft_correct": draft_ok[n],
                     "control_correct": control_ok[n], "draft_tokens": len(drafts[n]),
                     "draft_tail": drafts[n][d.position:],
                     "control_tail": controls[n][d.position:]})
    return recs


def require_training_data(args, verb: str) -> None:
    """Arbiters learn from training splits only, decoded greedily: refuse anything else."""
    if args.split not in TRAIN_SPLITS.get(args.task, ()):
        allowed = "; ".join(f"{t}: {', '.join(s)}" for t, s in TRAIN_SPLITS.items())
        raise CospecError(f"{verb} only uses training data ({allowed}); "
                          f"{args.task}/{args.split} is kept for evaluation")
    if args.temperature != 0:
        raise CospecError(f"{verb} is greedy: use --temperature 0")


def cmd_collect(args) -> int:
    from cospec.eval_setup import EvalSetup

    require_training_data(args, "collect")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before minutes of model loading
    s = EvalSetup(args, ["target", "draft"])
    meta = {"task": args.task, "split": args.split, "target": args.target,
            "draft": args.draft, "max_new_tokens": args.max_new_tokens,
            "max_points": args.max_points, "shard_size": args.shard_size,
            "branches": ["draft", "control"]}
    meta_file = out / "meta.json"
    if meta_file.exists():
        old = read_json(meta_file)
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise CospecError(f"{out} holds data collected with other settings ({', '.join(diff)})"
                              "; use another --out")
    meta_file.write_text(json.dumps(meta, indent=1))
    n = len(s.problems)
    shards = range(0, n, args.shard_size)
    bar = tqdm(total=n, desc="collect", unit="problem")
    for start in shards:
        f = out / f"shard-{start // args.shard_size:04d}.jsonl.gz"
        idx = list(range(start, min(start + args.shard_size, n)))
        if f.exists():
            bar.update(len(idx))
            continue
        t0 = time.perf_counter()
        recs = collect_shard(s, idx, args.max_points, args.batch_size)
        tmp = f.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as fh:
            fh.write(json.dumps({"shard_seconds": time.perf_counter() - t0}) + "\n")
            fh.writelines(json.dumps(r) + "\n" for r in recs)
        tmp.rename(f)
        bar.update(len(idx))
        pts = [r for r in recs if "position" in r]
        bar.set_postfix(points=len(pts),
                        draft_better=sum(r["draft_correct"] > r["target_correct"] for r in pts))
    bar.close()
    pts = read_points([out])
    print(f"{len(pts)} divergence points in {out}: draft branch better at "
          f"{sum(p['draft_correct'] > p['target_correct'] for p in pts)}, worse at "
          f"{sum(p['draft_correct'] < p['target_correct'] for p in pts)}")
    return 0


def add_parser(sub, add_model_args, add_decoding_args) -> None:
    p = sub.add_parser("collect", help="divergence points with both branches graded")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-points", type=int, default=8,
                   help="divergence points rolled out per problem (the first ones)")
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_collect)
