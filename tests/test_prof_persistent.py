"""scripts/prof_persistent.py's reading of a persistent launch's task trace, on the CPU (the
trace itself needs a GPU): spans, how long a finished stage takes to be seen, a task's work
after its wait, and the time a layer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prof_persistent.py"
_spec = importlib.util.spec_from_file_location("prof_persistent", SCRIPT)
prof_persistent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof_persistent)


def test_stage_table():
    """Three layers of stages of 2, 1, 1, 2, 1 tasks, stage s of layer l at B = (5 l + s) *
    10 µs: its tasks start at B - 2, their waits end at B + 0.5 and B + 1.5 (the second
    task of a two-task stage), each ends 3 µs after its wait, on SM 0 or 1. A task then sees
    the stage before it 7 + w - w' µs after that stage's last end (w' that stage's latest
    wait: 0.5 or 1.5)."""
    per_stage, layers = [2, 1, 1, 2, 1], 3
    rows = []
    for layer in range(layers):
        for s, n in enumerate(per_stage):
            base = (layer * 5 + s) * 10.0
            for i in range(n):
                over = base + (0.5 if i == 0 else 1.5)
                rows.append([base - 2, over, over + 3, i])
    trace = (torch.tensor(rows) * 1e3).round().long()         # nanoseconds
    out = prof_persistent.stage_table(trace, per_stage, layers)
    st = out["stages"]
    assert st["gate/up"]["tasks"] == 2 and st["q/k/v"]["tasks"] == 2
    assert st["gate/up"]["seen_median_us"] == pytest.approx(7.5)   # 7, 8 after o_proj's end
    assert st["gate/up"]["seen_max_us"] == pytest.approx(8.0)
    assert st["attention"]["seen_median_us"] == pytest.approx(6.0)  # after q/k/v's 1.5
    assert st["q/k/v"]["seen_median_us"] == pytest.approx(7.5)     # after the last down_proj
    assert st["gate/up"]["span_us"] == pytest.approx(6.5)
    assert st["down_proj"]["span_us"] == pytest.approx(5.5)
    assert all(r["after_median_us"] == pytest.approx(3.0) for r in st.values())
    assert out["layer_us"] == pytest.approx(50.0)
    assert out["sms"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "0.5b,9b"], "--sizes 9b: choose from"),
    (["--prefix", "0"], "--prefix 0: at least 1"),
    (["--set", "PERSIST_SPLITS=3"], "PERSIST_SPLITS is a power of two"),
])
def test_bad_arguments_named_before_any_gpu_work(monkeypatch, tmp_path, argv, message):
    """Unknown sizes, an empty cache and a bad setting end the script with a one-line error,
    on any machine (no GPU, no triton needed to say so)."""
    monkeypatch.setattr("sys.argv", ["prof_persistent.py", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit, match=message):
        prof_persistent.main()
    assert not list(tmp_path.iterdir())
