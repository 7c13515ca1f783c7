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

Output: ``OUT/meta.json`` (the settings the data depends on) and ``OUT/shard-NNNN.jsonl.gz``:
shard N holds problems N * S to (N + 1) * S - 1 of the task's split (S = ``--shard-size``), in
that order, and is written atomically. A rerun resumes: a shard that holds all of its problems
is kept as it is, a missing one is collected, and one that holds only the first of them (made
under a smaller ``--limit``) is completed, its records kept and the rest added (rewritten
atomically), so a rerun with a larger ``--limit`` collects exactly the new problems and never
duplicates a point. Refused before the models load: a folder whose shards hold problems beyond
``--limit`` (rerun with that many or more) or other problems, and one whose meta.json names
other settings (task, split, models, dtype, ``--no-chat``, ``--max-new-tokens``,
``--max-points``, ``--shard-size``), each difference named. ``--k``, ``--seed``, top-p and
top-k are not recorded: greedy lockstep decoding reads none of them.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cospec.arbiter import FEATURES
from cospec.args import changed_settings, positive_int, resolved_dtype
from cospec.assets import write_atomic
from cospec.batched import lockstep
from cospec.errors import CospecError, check_writable, read_json

TRAIN_SPLITS = {"gsm8k": ("dev",), "math500": ("train", "all"), "mbpp": ("dev",)}
# meta.json keys that folders made before they were recorded lack: not compared there
LATER_KEYS = dict.fromkeys(("no_chat", "dtype"))
SHARD_NAME = re.compile(r"shard-(\d+)\.jsonl\.gz")


def shard_files(paths: list[str | Path]) -> list[Path]:
    """The shard files named, or found in the folders named (``shard-*.jsonl.gz``, sorted);
    a shard holds a ``shard_seconds`` header line, then one record per problem (the target's
    path graded) and one per divergence point (with ``position``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("shard-*.jsonl.gz"))
        elif p.is_file():
            if not SHARD_NAME.fullmatch(p.name):
                raise CospecError(f"{p} is no shard of cospec collect (shard-N.jsonl.gz): "
                                  "give a collect folder or its shard files")
            files.append(p)
        else:
            raise CospecError(f"no divergence data at {p}")
    if not files:
        raise CospecError(f"no shard-*.jsonl.gz files in {', '.join(map(str, paths))}")
    return files


REDO = "delete it and run the same cospec collect again to redo it"


def check_point(rec: dict, where: str) -> None:
    """Refuse a divergence record train cannot use: a missing or non-string ``id``,
    ``features`` that are not ``len(FEATURES)`` finite numbers, or grades that are not
    true/false. ``where`` names the file and line in the message."""
    if not isinstance(rec.get("id"), str):
        raise CospecError(f"{where}: a divergence point without a problem id")
    feats = rec.get("features")
    if not isinstance(feats, list) or len(feats) != len(FEATURES):
        n = len(feats) if isinstance(feats, list) else "no"
        raise CospecError(f"{where}: {n} features, the arbiter takes {len(FEATURES)} "
                          "(collected by another cospec version? collect it again)")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
               for x in feats):
        raise CospecError(f"{where}: features that are not all finite numbers")
    for key in ("target_correct", "draft_correct"):
        if not isinstance(rec.get(key), (bool, int, float)) or rec[key] not in (0, 1):
            raise CospecError(f"{where}: {key} is {rec.get(key)!r}, not true or false")


def shard_points(path: Path) -> list[dict]:
    """The divergence records (those with ``position``) of one shard, each checked.

    A shard that is not gzip, is cut short, or has a line that is not a JSON object is
    refused, naming the file (and line), even when only its last line is cut: collect
    writes each shard whole (to a temporary file, then renamed), so an interrupted collect
    leaves no cut shard, and one found cut was damaged afterwards; training on the rest
    without a word would be silently wrong, so the message says how to redo it.
    """
    out = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CospecError(f"{path} line {n} is not valid JSON ({err.msg}, "
                                      f"column {err.colno}): the shard is damaged; {REDO}"
                                      ) from None
                if not isinstance(rec, dict):
                    raise CospecError(f"{path} line {n} is not a JSON object: {REDO}")
                if "position" in rec:
                    check_point(rec, f"{path} line {n}")
                    out.append(rec)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise CospecError(f"{path} is not a readable gzip shard ({err}); {REDO}") from None
    return out


def read_points(paths: list[str | Path]) -> list[dict]:
    """All divergence records of the shard files or collect folders ``paths`` (a file named
    twice, or named and inside a folder named, is read once)."""
    seen: set[Path] = set()
    points: list[dict] = []
    for f in shard_files(paths):
        if f.resolve() not in seen:
            seen.add(f.resolve())
            points += shard_points(f)
    return points


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
    """Arbiters learn from training splits only, decoded greedily: refuse anything else (an
    unknown task or split named as such, as ``cospec eval`` names it)."""
    from cospec.tasks import get_task

    get_task(args.task).split(args.split)
    if args.split not in TRAIN_SPLITS.get(args.task, ()):
        allowed = "; ".join(f"{t}: {', '.join(s)}" for t, s in TRAIN_SPLITS.items())
        raise CospecError(f"{verb} only uses training data ({allowed}); "
                          f"{args.task}/{args.split} is kept for evaluation")
    if args.temperature != 0:
        raise CospecError(f"{verb} is greedy: use --temperature 0")


def pair_specs(args) -> tuple[str, str]:
    """(target, draft) as collect loads them: ``--models`` names exactly two (the draft
    first), else ``--target`` and ``--draft``."""
    if not args.models:
        return args.target, args.draft
    specs = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(specs) != 2:
        raise CospecError(f"collect rolls out one draft against one target: --models takes "
                          f"two models (the draft first), got {args.models!r}")
    return specs[1], specs[0]


def collect_meta(args) -> dict:
    """The settings collected data depends on (meta.json)."""
    target, draft = pair_specs(args)
    return {"task": args.task, "split": args.split, "target": target, "draft": draft,
            "max_new_tokens": args.max_new_tokens, "max_points": args.max_points,
            "shard_size": args.shard_size, "branches": ["draft", "control"],
            "no_chat": args.no_chat, "dtype": resolved_dtype(args)}


def existing_shards(out: Path) -> dict[int, Path]:
    """The shard files in ``out`` by number."""
    found = (SHARD_NAME.fullmatch(f.name) for f in out.glob("shard-*.jsonl.gz"))
    return {int(m.group(1)): out / m.group(0) for m in found if m}


def check_meta(out: Path, meta: dict) -> None:
    """Refuse a folder whose shards were collected with other settings, naming each one (a
    folder without shards takes the new ones); keys an older meta.json lacks are noted."""
    meta_file = out / "meta.json"
    if not meta_file.exists() or not existing_shards(out):
        return
    old = read_json(meta_file)
    if not isinstance(old, dict):
        raise CospecError(f"{meta_file} is not a collect meta.json; use another --out")
    unknown = [k for k in LATER_KEYS if k not in old]
    diff = [f"{k}: {a!r} -> {b!r}"
            for k, (a, b) in changed_settings(old, meta, meta, LATER_KEYS).items()]
    if diff:
        raise CospecError(f"{out} holds data collected with other settings ({'; '.join(diff)})"
                          "; use another --out")
    if unknown:
        print(f"note: {meta_file} predates recording {', '.join(unknown)}: taken to be this "
              "run's", file=sys.stderr)


def read_shard(f: Path) -> tuple[float, list[dict]]:
    """A shard's ``shard_seconds`` and records; CospecError naming it if it is damaged."""
    try:
        with gzip.open(f, "rt") as fh:
            lines = fh.read().splitlines()
        seconds = float(json.loads(lines[0])["shard_seconds"])
        recs = [json.loads(x) for x in lines[1:]]
        if not all(isinstance(r, dict) and "id" in r for r in recs):
            raise ValueError("a record without an id")
    except (OSError, EOFError, zlib.error, ValueError, IndexError, KeyError, TypeError) as err:
        raise CospecError(f"{f} is not a readable shard ({err}); delete it to collect its "
                          "problems again") from None
    return seconds, recs


@dataclass
class Shard:
    """Shard ``file``: problems ``idx`` once complete, of which it holds the first ``held``
    (``recs``, collected in ``seconds``)."""

    file: Path
    idx: list[int]
    held: int = 0
    seconds: float = 0.0
    recs: list[dict] = field(default_factory=list)

    @property
    def todo(self) -> list[int]:
        return self.idx[self.held:]


def held_shards(out: Path, ids: list[str], size: int, what: str) -> dict[int, Shard]:
    """The shards in ``out``, each checked to hold the first problems of its slice of
    ``ids`` (all of the split's problem ids); CospecError naming one that does not."""
    held = {}
    for k, f in sorted(existing_shards(out).items()):
        seconds, recs = read_shard(f)
        got = [r["id"] for r in recs if "position" not in r]
        first = k * size
        if len(got) > size or got != ids[first:first + len(got)]:
            raise CospecError(f"{f} holds other problems than {what} {first}-"
                              f"{first + size - 1} (--shard-size {size}); use another --out")
        held[k] = Shard(f, list(range(first, first + len(got))), len(got), seconds, recs)
    return held


def plan_shards(out: Path, ids: list[str], limit: int | None, size: int, what: str
                ) -> list[Shard]:
    """The shards of the first ``limit`` problems (all where None), with what ``out``
    already holds of each; refuses a folder holding problems beyond ``limit``."""
    n = len(ids) if limit is None else min(limit, len(ids))
    held = held_shards(out, ids, size, what)
    beyond = max((sh.idx[-1] + 1 for sh in held.values() if sh.idx), default=0)
    if beyond > n:
        raise CospecError(f"{out} holds the data of {what} problems up to number {beyond}, "
                          f"beyond --limit {limit}; rerun with --limit {beyond} or more, "
                          "or use another --out")
    plan = []
    for first in range(0, n, size):
        sh = held.get(first // size) or Shard(out / f"shard-{first // size:04d}.jsonl.gz", [])
        sh.idx = list(range(first, min(first + size, n)))
        if not sh.todo:
            sh.recs = []  # complete: kept as it is, its records not needed
        plan.append(sh)
    return plan


def write_shard(f: Path, recs: list[dict], seconds: float) -> None:
    """Write shard ``f`` atomically: a ``shard_seconds`` header line, then ``recs``."""
    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt") as fh:
            fh.write(json.dumps({"shard_seconds": seconds}) + "\n")
            fh.writelines(json.dumps(r) + "\n" for r in recs)
    write_atomic(f, write)


def fill_shard(s, sh: Shard, args) -> list[dict]:
    """Collect the problems shard ``sh`` lacks and rewrite it whole, the records it held
    first; returns the new records."""
    t0 = time.perf_counter()
    new = collect_shard(s, sh.todo, args.max_points, args.batch_size)
    write_shard(sh.file, sh.recs + new, sh.seconds + time.perf_counter() - t0)
    return new


def cmd_collect(args) -> int:
    from cospec.eval_setup import EvalSetup
    from cospec.tasks import get_task

    require_training_data(args, "collect")
    meta = collect_meta(args)
    out = Path(args.out)
    check_writable(out, f"--out {out}")
    out.mkdir(parents=True, exist_ok=True)
    check_meta(out, meta)  # every check before minutes of model loading
    ids = [p.id for p in get_task(args.task).problems(args.split)]
    plan = plan_shards(out, ids, args.limit, args.shard_size, f"{args.task}/{args.split}")
    s = EvalSetup(args, ["target", "draft"])
    write_atomic(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    bar = tqdm(total=sum(len(sh.idx) for sh in plan), initial=sum(sh.held for sh in plan),
               desc="collect", unit="problem")
    for sh in plan:
        if not sh.todo:
            continue
        todo = len(sh.todo)
        pts = [r for r in fill_shard(s, sh, args) if "position" in r]
        bar.update(todo)
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
    p.add_argument("--limit", type=positive_int, default=None,
                   help="the first N problems (a rerun with a larger N adds the rest)")
    p.add_argument("--max-points", type=positive_int, default=8,
                   help="divergence points rolled out per problem (the first ones)")
    p.add_argument("--shard-size", type=positive_int, default=50)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_collect)
