"""scripts/prof_gaps.py's arithmetic, on the CPU: the GPU's busy time as the union of its work
intervals, the idle gaps by class, their sums over prompts and per token and step. (The
profiling itself needs a GPU and the real pair.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prof_gaps.py"
_spec = importlib.util.spec_from_file_location("prof_gaps", SCRIPT)
prof_gaps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof_gaps)


def test_busy_is_the_union_and_gaps_are_classed():
    # kernels (µs): [0, 10) and [5, 12) overlap (a copy beside a kernel); then gaps of
    # 3 (short), 40 (medium) and 250 (long); [15, 20) contains [16, 18)
    spans = [(0, 10, "a"), (5, 12, "copy"), (15, 20, "b"), (16, 18, "c"), (60, 70, "d"),
             (320, 330, "e")]
    got = prof_gaps.idle_gaps(spans)
    assert got["busy_us"] == pytest.approx(12 + 5 + 10 + 10)
    assert got["span_us"] == pytest.approx(330)
    assert got["idle_us"] == pytest.approx(3 + 40 + 250)
    assert (got["short_gaps"], got["medium_gaps"], got["long_gaps"]) == (1, 1, 1)
    assert (got["short_us"], got["medium_us"], got["long_us"]) == (3, 40, 250)
    assert prof_gaps.idle_gaps([])["span_us"] == 0
    # the medium and long gaps by the work that ended last before them and the work after:
    # [15, 20) "b" ends after "c" does, so "b" is before the 40 µs gap
    assert got["around"] == {"b → d": [1, 40], "d → e": [1, 250]}


def test_intervals_keep_the_gpu_work_only_sorted():
    def ev(start, end, device, name="k"):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end),
                               device_type=device, name=name)

    events = [ev(30, 40, DeviceType.CUDA), ev(0, 100, DeviceType.CPU),
              ev(5, 9, DeviceType.CUDA, "x" * 100)]
    assert prof_gaps.intervals(events) == [(5, 9, "x" * prof_gaps.NAME), (30, 40, "k")]


def test_totals_and_per_unit():
    a = prof_gaps.idle_gaps([(0, 10, "x"), (20, 30, "y")])     # 10 idle (medium)
    b = prof_gaps.idle_gaps([(0, 5, "x"), (205, 215, "y"), (300, 310, "z")])  # 200 + 85
    both = prof_gaps.total([a, b])
    assert both["busy_us"] == 45 and both["idle_us"] == 295 and both["long_gaps"] == 1
    assert both["around"] == {"x → y": [2, 210], "y → z": [1, 85]}  # summed pair by pair
    unit = prof_gaps.per_unit(both, tokens=7, steps=2)
    assert unit["idle_us_per_step"] == 147.5 and unit["long_us_per_step"] == 100
    assert unit["idle_share"] == pytest.approx(295 / 340)
    md = prof_gaps.markdown({"device": "GPU", "task": "gsm8k", "prompts": 2, "k": 5,
                             "new": 256, "methods": {"spd": both | unit}})
    assert "| spd | 7 | 2 |" in md
    assert md.index("| `x → y` | 2 | 1.00 | 105.0 |") < md.index("| `y → z` | 1 | 0.50 | 42.5 |")


def test_spd_block_runs_as_a_method(monkeypatch):
    """``--methods spd-block``: the device-side block behind a method's ``run``, giving the
    target's greedy tokens and a step a block (tiny models, CPU)."""
    import torch
    from tiny import tiny_model

    from cospec.acceptance import ExactRule
    from cospec.decoding import generate

    monkeypatch.setenv("COSPEC_STATIC", "1")
    target = tiny_model(11, dtype=torch.float32)
    pair = SimpleNamespace(target=target, draft=tiny_model(11, dtype=torch.float32))
    prompt = [5, 17, 33, 2]
    ids, flags, stats = prof_gaps.BlockSpd(pair).run(prompt, k=3, max_new_tokens=9,
                                                     sampling=None, eos_ids=())
    want = [t.id for t in generate(target, None, prompt, ExactRule(), k=1, max_new_tokens=9)]
    assert ids == want and flags is None
    assert stats.steps == 3  # an agreeing draft: 3 blocks of k + 1 = 4 tokens cover 9
