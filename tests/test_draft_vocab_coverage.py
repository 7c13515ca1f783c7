"""scripts/draft_vocab_coverage.py's arithmetic, on the CPU: token and k-window coverage of a
draft vocabulary, the frequency ranking and the vocabulary filled up by id."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "draft_vocab_coverage.py"
_spec = importlib.util.spec_from_file_location("draft_vocab_coverage", SCRIPT)
dvc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvc)


def test_coverage_counts_tokens_and_whole_windows():
    seqs = [[1, 2, 9, 3], [4, 5]]           # 9 is outside; windows of 2: (1,2) (2,9) (9,3) (4,5)
    tokens, windows = dvc.coverage(seqs, {1, 2, 3, 4, 5}, k=2)
    assert tokens == pytest.approx(5 / 6) and windows == pytest.approx(2 / 4)
    assert dvc.coverage([[7]], {7}, k=3) == (1.0, 0.0)  # no window of 3 in one token


def test_ranking_and_vocabulary():
    assert dvc.ranked([[5, 5, 3], [3, 9, 5]]) == [5, 3, 9]  # by count, then by id
    assert dvc.vocabulary([5, 3, 9], 2) == {5, 3}
    assert dvc.vocabulary([5, 3], 4) == {5, 3, 0, 1}     # filled up by id
