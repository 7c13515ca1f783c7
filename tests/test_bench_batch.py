"""scripts/bench_batch.py (cospec's batch engine offline) on tiny models on the CPU: every
configuration's tokens are counted, and each run records the prefill its engine really used."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_batch.py"
_spec = importlib.util.spec_from_file_location("bench_batch", SCRIPT)
bench_batch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_batch)


def test_tiny_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("COSPEC_STATIC", "1")  # what --tiny sets: undone after this test
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("argv, error", [
    (["--random", "1.5b"], "no GPU here"),
    (["--prompt-ids", "x.json"], "--prompt-ids goes with --random"),
])
def test_usage_errors(argv, error, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_batch.py", "--out", str(tmp_path)] + argv)
    with pytest.raises(SystemExit) as stop:
        bench_batch.main()
    assert stop.value.code == 2 and error in capsys.readouterr().err


def test_random_target_takes_the_given_prompt_ids(tmp_path, monkeypatch):
    """--prompt-ids: the random target decodes the first --prompts prompts of the file (its
    model stood in by a tiny one: the real one is built on CUDA)."""
    import gpu_speed

    monkeypatch.setattr(gpu_speed, "random_model", lambda size: tiny_model(1))
    ids = [[5, 6, 7], [8] * 40, [9, 10]]
    (tmp_path / "p.json").write_text(json.dumps(ids))
    args = SimpleNamespace(random="1.5b", prompts=2, prompt_ids=tmp_path / "p.json")
    model, draft, prompts, eos = bench_batch.random_target(args)
    assert prompts == ids[:2] and draft is None and eos == []
    args.prompt_ids = None  # without: 128 random tokens each
    assert [len(p) for p in bench_batch.random_target(args)[2]] == [128, 128]
