"""``EvalSetup``: a loaded pair, a task's problems and their prompts, with the methods built
for them: what ``cospec eval``, ``bench``, ``collect`` and ``refine`` share."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from cospec.args import load_pair_of, options_of, sampling_of
from cospec.methods import SHIPPED_ARBITER, build_method, encode_prompt, eos_ids, needs_draft
from cospec.sandbox import kind as sandbox_kind
from cospec.tasks import get_task


class EvalSetup:
    """A loaded pair, a task and its prompts: what eval and bench share."""

    def __init__(self, args, methods: list[str]):
        self.args, self.methods = args, methods
        self.task = get_task(args.task)
        problems = self.task.problems(args.split)
        if args.limit is not None:
            problems = problems[:args.limit]
        self.problems = problems
        self.sampling, options = sampling_of(args), options_of(args)
        self.pair = load_pair_of(args, need_draft=needs_draft(methods))
        self.built = {m: build_method(m, self.pair, options, self.sampling) for m in methods}
        tok = self.pair.tokenizer
        self.prompts = [encode_prompt(tok, p.prompt, chat=not args.no_chat) for p in problems]
        self.eos = eos_ids(tok, self.pair.target)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]
        self.device = next(self.pair.target.parameters()).device
        self.arbiter_path = args.arbiter or (str(SHIPPED_ARBITER) if "cospec" in methods
                                             else None)

    def grader(self) -> dict:
        """What graded a record: code answers name their sandbox (bwrap or process)."""
        return {"sandbox": sandbox_kind()} if self.task.name in ("humaneval", "mbpp") else {}

    def text(self, ids: list[int]) -> str:
        return self.pair.tokenizer.decode(ids, skip_special_tokens=True)

    def grade(self, items: list[tuple[int, list[int]]]) -> list[bool]:
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            return list(pool.map(lambda it: self.task.grade(self.problems[it[0]],
                                                            self.text(it[1])), items))

    def run_one(self, method: str, i: int, max_new_tokens: int | None = None):
        a = self.args
        return self.built[method].run(self.prompts[i], k=a.k,
                                      max_new_tokens=max_new_tokens or a.max_new_tokens,
                                      sampling=self.sampling, eos_ids=self.eos, seed=a.seed)
