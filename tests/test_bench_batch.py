"""scripts/bench_batch.py (cospec's batch engine offline) on tiny models on the CPU: every
configuration's tokens are counted, and each run records the prefill its engine really used."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_batch.py"
_spec = importlib.util.spec_from_file_location("bench_batch", SCRIPT)
bench_batch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_batch)


def test_tiny_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_batch.py", "--tiny", "--out", str(tmp_path),
                                      "--batches", "1,2", "--new", "6", "--prompts", "4"])
    bench_batch.main()
    runs = json.loads((tmp_path / "bench_batch.json").read_text())["runs"]
    assert [(r["rows"], r["method"]) for r in runs] == [(1, "target"), (1, "spd"),
                                                         (2, "target"), (2, "spd")]
    for r in runs:
        assert r["generated"] == 4 * 6 and r["tokens_per_s"] > 0  # EOS ignored
        assert r["prefill"] == "eager"  # a CPU engine has no graphs to replay


def lm(graphs: bool, compiled: bool) -> SimpleNamespace:
    return SimpleNamespace(graph_prefill=graphs, compiled_prefill=compiled)


@pytest.mark.parametrize("models, want", [
    ([lm(True, False), lm(True, False)], "graphs"),
    ([lm(False, True)], "compiled"),
    ([lm(False, False), lm(False, False)], "eager"),
    ([lm(True, False), lm(False, False)], "mixed"),
])
def test_prefill_used_names_what_the_models_did(models, want):
    assert bench_batch.prefill_used(models) == want
