"""Greedy speculation schedules replayed along the target's own outputs, with the draft's
greedy tokens: which mix of the draft and prompt lookup could give spd >= 1.5x, offline.

    python scripts/schedule_bound.py --out DIR [--problems 200] [--k 5]

The draft's greedy token at every position of the target's committed greedy outputs
(``results/gpu/{gsm8k-heldout,humaneval}``, method ``target``) comes from one teacher-forced
forward of the draft over prompt + output (float32, CPU; cached in
DIR/draft_tokens.jsonl.gz, resumed). Along the target's path the draft's chain equals the
target's while it matches, so a block's verdict is exact: a draft token is kept while it
equals the target's token, and the first one that does not ends the block.

Schedules (each block emits its kept tokens plus the target's own), costed in one step's
time of the fused layers on an H200 or an H100 (``--costs``; ``STEP_MS``, steps of 3-7 rows
costed as 6 rows):

- **spd**: k draft steps (the first over 2 rows), a verify over k + 1 rows. Its τ here
  checks the replay against the measured real-pair τ.
- **lookup**: prompt lookup's up-to-k tokens alone (``cospec.lookup``, no draft).
- **spd-lookup**: the lookup where it proposes a whole block, spd's block otherwise.
- **spd-staged, host loop** (the draft verifies the lookup): before each draft step the lookup
  proposes up to the block's remaining tokens from the sequence so far (committed and
  drafted); one draft step over them keeps the prefix equal to the draft's own greedy tokens
  plus one token of its own. The proposals are exactly spd's (the target's verdicts and
  output do not change); a draft step costs 1 row's time without a lookup proposal, a few
  rows' with one. This is staged speculation (the draft speculating on itself) with prompt
  lookup as the cheapest stage.

Writes DIR/schedule_bound.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_lookup_bound import RECORDS, SPD_TAU, kept, lookup  # noqa: E402

from cospec.lookup import NgramIndex  # noqa: E402

TASKS = ("GSM8K heldout", "HumanEval")
# ms a step of the fused layers (bf16, position 100, the defaults) over 1, 2 and 6 rows:
# the draft (0.5B) and the target (1.5B). H200: results/gpu/h200/fused-few-row-attention-
# chunks/defaults.md; H100: results/gpu/h100/lookup-int8-real-pair/step-rows. h200-int8: the
# draft reading its int8 copies (results/gpu/h200/int8-draft: 1 row tiles/, 512-weight
# blocks; 2 rows block/; 5 rows steps/, standing for 6), the H200's target
STEP_MS = {"h200": {"draft": (0.535, 0.762, 0.791), "target": (1.171, 1.529, 1.577)},
           "h200-int8": {"draft": (0.497, 0.637, 0.649), "target": (1.171, 1.529, 1.577)},
           "h100": {"draft": (0.600, 0.831, 0.851), "target": (1.454, 1.788, 1.846)}}
C = STEP_MS["h200"]  # the costs in use (main sets them)


def step_ms(model: str, rows: int) -> float:
    """One step of ``model`` over ``rows`` rows (3-7 rows: the 6-row step's time)."""
    one, two, few = C[model]
    return one if rows == 1 else two if rows == 2 else few


def draft_ms(rows: int) -> float:
    return step_ms("draft", rows)


def verify_ms(rows: int) -> float:
    return step_ms("target", rows)


def spd_block_ms(k: int) -> float:
    """A k-draft spd block: the draft's 2-row first step, k - 1 one-row steps, the verify."""
    return draft_ms(2) + (k - 1) * draft_ms(1) + verify_ms(k + 1)


def kept_drafts(draft: list[int], out: list[int], i: int, k: int) -> int:
    """How many of the draft's k greedy tokens after out[:i] the target keeps: those equal
    to its own (``draft[j]``: the draft's greedy token after out[:j])."""
    a = 0
    while a < k and i + a < len(out) and draft[i + a] == out[i + a]:
        a += 1
    return a


def spd(draft: list[int], out: list[int], k: int) -> tuple[float, int, int]:
    """(ms, tokens, blocks) of greedy spd along ``out``."""
    ms, i, blocks = 0.0, 0, 0
    while i < len(out):
        a = kept_drafts(draft, out, i, k)
        ms += spd_block_ms(k)
        i, blocks = i + a + 1, blocks + 1
    return ms, len(out), blocks


def spd_lookup(prompt: list[int], draft: list[int], out: list[int], k: int
               ) -> tuple[float, int, int]:
    """``spd-lookup``: a whole-block lookup proposal verified alone, spd's block otherwise
    (the draft's first step after a lookup block catches up on one more row)."""
    ms, i, blocks, index = 0.0, 0, 0, NgramIndex()
    while i < len(out):
        proposal = lookup(index, prompt, out, i, k)
        if len(proposal) >= k:
            a = kept(proposal, out, i)
            ms += verify_ms(k + 1) + draft_ms(2) - draft_ms(1)
        else:
            a = kept_drafts(draft, out, i, k)
            ms += spd_block_ms(k)
        i, blocks = i + a + 1, blocks + 1
    return ms, len(out), blocks


def staged(prompt: list[int], draft: list[int], out: list[int], k: int, max_rows: int,
           first_only: bool = False, whole: bool = False) -> tuple[float, int, int, int]:
    """(ms, tokens, blocks, draft steps) of spd whose draft verifies prompt-lookup proposals
    of up to ``max_rows`` - 1 tokens before each of its steps. The draft's chain is walked
    along ``out`` while it equals the target's; once it differs the rest of the block is
    rejected whatever it holds, so only its steps' count (cost) matters there: those are
    taken as one-row steps. ``first_only``: the lookup before a block's first step only (the
    host reads the draft's tokens once a block then, as spd's does). ``whole``: a lookup
    proposal of a whole block is verified alone, no draft step (``spd-lookup``'s rule)."""
    ms, i, blocks, steps, index = 0.0, 0, 0, 0, NgramIndex()
    while i < len(out):
        if whole:
            proposal = lookup(index, prompt, out, i, k)
            if len(proposal) >= k:
                ms += verify_ms(k + 1) + draft_ms(2) - draft_ms(1)
                i, blocks = i + kept(proposal, out, i) + 1, blocks + 1
                continue
        j, diverged, first = 0, False, True  # j: tokens drafted this block
        while j < k:
            rows = 2 if first else 1  # the first step catches up on the block's last token
            got = 1
            if not diverged and (first or not first_only):
                chain = NgramIndex()  # the draft's chain so far == out's
                chain.sync(prompt + out[:i + j])
                proposal = chain.propose(min(k - j - 1, max_rows - rows))
                if proposal:
                    rows += len(proposal)
                    agree = 0  # lookup tokens equal to the draft's own greedy chain
                    while (agree < len(proposal) and i + j + agree < len(out)
                           and proposal[agree] == draft[i + j + agree]
                           and draft[i + j + agree] == out[i + j + agree]):
                        agree += 1
                    got = agree + 1
            ms += draft_ms(rows)
            steps, first = steps + 1, False
            for t in range(got):
                if j + t >= k:
                    break
                if i + j + t >= len(out) or draft[i + j + t] != out[i + j + t]:
                    diverged = True
            j += got
        a = kept_drafts(draft, out, i, k)
        ms += verify_ms(k + 1)
        i, blocks = i + a + 1, blocks + 1
    return ms, len(out), blocks, steps


class Earlier:
    """The outputs of a task's earlier problems, as a server would have answered them before
    this one, indexed by n-gram (n = 1..NGRAM): ``propose(seq, m)`` gives the m tokens that
    followed the latest earlier occurrence of seq's longest suffix found there."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.index = NgramIndex()

    def add(self, out: list[int]) -> None:
        self.tokens += [*out, -1]  # -1: no n-gram spans two outputs
        self.index.sync(self.tokens)

    def propose(self, seq: list[int], m: int) -> list[int]:
        for n in range(min(self.index.ngram, len(seq)), 0, -1):
            end = self.index.ends.get(tuple(seq[-n:]))
            if end is not None:
                ahead = self.tokens[end:end + m]
                return ahead[:ahead.index(-1)] if -1 in ahead else ahead  # this output's
        return []


def extended(prompt: list[int], draft: list[int], out: list[int], k: int, guesses: int,
             earlier: Earlier | None = None) -> tuple[float, int, int]:
    """(ms, tokens, blocks) of spd whose block's first draft step also checks up to
    ``guesses`` prompt-lookup guesses (from the committed sequence) and whose block is then
    the k - 1 one-row steps of spd's after them: k + c proposals, c the guesses that stood,
    all the draft's own; a static schedule a device-side block can run (the first step over
    2 + guesses rows, the verify over k + guesses + 1, whatever stood). ``earlier``: where
    the sequence offers fewer guesses, those from the task's earlier outputs (``Earlier``)
    when it offers more."""
    ms, i, blocks, index = 0.0, 0, 0, NgramIndex()
    while i < len(out):
        guess = lookup(index, prompt, out, i, guesses)
        if earlier is not None and len(guess) < guesses:
            other = earlier.propose(prompt + out[:i], guesses)
            guess = other if len(other) > len(guess) else guess
        c = 0  # guesses equal to the draft's own chain (== out's while it matches)
        while (c < len(guess) and i + c < len(out) and guess[c] == draft[i + c]
               and draft[i + c] == out[i + c]):
            c += 1
        a = kept_drafts(draft, out, i, k + c)
        ms += draft_ms(2 + guesses) + (k - 1) * draft_ms(1) + verify_ms(k + guesses + 1)
        i, blocks = i + a + 1, blocks + 1
    return ms, len(out), blocks


def draft_tokens(path: Path, rows: dict, prompts: dict, tok, limit: int) -> dict:
    """{(task, id): the draft's greedy token after each prefix of the target's output},
    computed where ``path`` lacks them (appended as they finish: a rerun resumes)."""
    import torch
    from tqdm import tqdm

    from cospec.models import DEFAULT_DRAFT, load_model

    have = {}
    if path.exists():
        with gzip.open(path, "rt") as f:
            for line in f:
                with_ok = line.strip()
                if with_ok:
                    r = json.loads(with_ok)
                    have[(r["task"], r["id"])] = r["draft"]
    todo = [(t, r) for t in TASKS for r in rows[t][:limit] if (t, r["id"]) not in have]
    if not todo:
        return have
    model, _ = load_model(DEFAULT_DRAFT, device="cpu", dtype=torch.float32)
    with gzip.open(path, "at") as f, torch.inference_mode():
        for task, r in tqdm(todo, desc="draft along the target"):
            prompt = prompts[task][r["id"]]
            ids = torch.tensor([prompt + r["out"]])
            logits = model(ids).logits[0, len(prompt) - 1:-1]
            pred = logits.argmax(-1).tolist()
            have[(task, r["id"])] = pred
            f.write(json.dumps({"task": task, "id": r["id"], "draft": pred}) + "\n")
            f.flush()
    return have


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--problems", type=int, default=200, help="the first N of each task")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-rows", type=int, default=6,
                   help="rows of a staged draft step at most (its catch-up row included)")
    p.add_argument("--costs", choices=sorted(STEP_MS), default="h200",
                   help="whose step times cost the schedules")
    a = p.parse_args(argv)
    C.update(STEP_MS[a.costs])
    if a.problems < 1 or a.k < 1 or a.max_rows < 2:
        p.error("--problems and --k must be >= 1, --max-rows >= 2")
    from transformers import AutoTokenizer

    from cospec.methods import encode_prompt
    from cospec.models import DEFAULT_TARGET, resolve
    from cospec.tasks import get_task

    tok = AutoTokenizer.from_pretrained(resolve(DEFAULT_TARGET))
    rows, prompts = {}, {}
    for name in TASKS:
        task, split, path = RECORDS[name]
        texts = {pr.id: pr.prompt for pr in get_task(task).problems(split)}
        with gzip.open(path, "rt") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        rows[name] = []
        for r in recs:
            if r.get("method") == "target":
                ids = r["token_ids"]
                rows[name].append({"id": r["id"],
                                   "out": json.loads(ids) if isinstance(ids, str) else ids})
        prompts[name] = {r["id"]: encode_prompt(tok, texts[r["id"]]) for r in rows[name]}
    a.out.mkdir(parents=True, exist_ok=True)
    drafts = draft_tokens(a.out / "draft_tokens.jsonl.gz", rows, prompts, tok, a.problems)
    res = {"k": a.k, "problems": a.problems, "max_rows": a.max_rows, "costs": a.costs,
           "step_ms_1_2_6_rows": C, "measured_spd_tau_k5": SPD_TAU, "tasks": {}}
    for name in TASKS:
        tot = {s: [0.0, 0, 0] for s in ("target", "spd", "spd-lookup", "spd-staged",
                                         "spd-staged-first", "spd-lookup-staged",
                                         "spd-extended", "spd-extended-earlier")}
        steps, earlier = 0, Earlier()
        for r in rows[name][:a.problems]:
            out, pr, d = r["out"], prompts[name][r["id"]], drafts[(name, r["id"])]
            parts = {"target": (len(out) * verify_ms(1), len(out), len(out)),
                     "spd": spd(d, out, a.k), "spd-lookup": spd_lookup(pr, d, out, a.k)}
            *s, n = staged(pr, d, out, a.k, a.max_rows)
            parts["spd-staged"], steps = tuple(s), steps + n
            parts["spd-staged-first"] = staged(pr, d, out, a.k, a.max_rows, True)[:3]
            parts["spd-lookup-staged"] = staged(pr, d, out, a.k, a.max_rows, whole=True)[:3]
            parts["spd-extended"] = extended(pr, d, out, a.k, a.max_rows - 2)
            parts["spd-extended-earlier"] = extended(pr, d, out, a.k, a.max_rows - 2, earlier)
            earlier.add(out)
            for key, (ms, tokens, blocks) in parts.items():
                t = tot[key]
                t[0], t[1], t[2] = t[0] + ms, t[1] + tokens, t[2] + blocks
        base = tot["target"][0]
        res["tasks"][name] = {
            key: {"ms": ms, "tokens": n, "blocks": b, "tau": n / b, "bound": base / ms}
            for key, (ms, n, b) in tot.items()} | {
            "staged_draft_steps_per_block": steps / tot["spd-staged"][2]}
        print(name, {k2: round(v["bound"], 3) for k2, v in res["tasks"][name].items()
                     if isinstance(v, dict)}, flush=True)
    (a.out / "schedule_bound.json").write_text(json.dumps(res, indent=1))
    lines = [f"Greedy schedules along the target's outputs (first {a.problems} problems a "
             f"task), k = {a.k}, a staged draft step of at most {a.max_rows} rows; "
             f"{a.costs.upper()} step times over 1 / 2 / 6 rows (ms): draft {C['draft']}, "
             f"target {C['target']}", "",
             "| task | τ spd (measured, k = 5) | spd | spd-lookup | spd-staged, host loop | "
             "its draft steps a block | spd-staged, device block | its τ | the same, guesses "
             "from earlier outputs too | its τ | staged, first step only | spd-lookup + staged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        measured = f" ({SPD_TAU[name]})" if a.k == 5 else ""
        lines.append(f"| {name} | {t['spd']['tau']:.2f}{measured} | "
                     f"{t['spd']['bound']:.2f}× | {t['spd-lookup']['bound']:.2f}× | "
                     f"**{t['spd-staged']['bound']:.2f}×** | "
                     f"{t['staged_draft_steps_per_block']:.2f} | "
                     f"**{t['spd-extended']['bound']:.2f}×** | {t['spd-extended']['tau']:.2f} | "
                     f"{t['spd-extended-earlier']['bound']:.2f}× | "
                     f"{t['spd-extended-earlier']['tau']:.2f} | "
                     f"{t['spd-staged-first']['bound']:.2f}× | "
                     f"{t['spd-lookup-staged']['bound']:.2f}× |")
    (a.out / "schedule_bound.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
