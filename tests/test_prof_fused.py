"""scripts/prof_fused.py's per-kernel profile, on the CPU: kernel launches and device time
summed by name from profiler events, split into a layer's share and what lies outside the
layers, and written as a table. (The measuring itself needs a GPU: ``gpu_stages.sh fused``.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prof_fused.py"
_spec = importlib.util.spec_from_file_location("prof_fused", SCRIPT)
prof_fused = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof_fused)


def event(name: str, us: float, device=DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, device_time_total=us)


def forward(layers: int) -> list[SimpleNamespace]:
    """A forward's events: two `attn` and one `mlp` launch a layer, an embedding and a head
    outside the layers, a copy, and a CPU-side op."""
    evs = [event("embed", 2.0), event("Memcpy HtoD", 50.0), event("aten::mm", 99.0,
                                                                   DeviceType.CPU)]
    for _ in range(layers):
        evs += [event("attn", 5.0), event("mlp", 7.5), event("attn", 5.0)]
    return evs + [event("head", 40.0)]


def test_kernel_times_sums_launches_and_device_time_by_name():
    got = prof_fused.kernel_times(forward(3))
    assert got == {"head": [1, 40.0], "attn": [6, 30.0], "mlp": [3, 22.5], "embed": [1, 2.0]}
    assert list(got) == ["head", "attn", "mlp", "embed"]  # most time first


def test_per_layer_splits_a_layer_from_what_lies_outside():
    every, one = prof_fused.kernel_times(forward(24)), prof_fused.kernel_times(forward(1))
    rows = {r["kernel"]: r for r in prof_fused.per_layer(every, one, 24)}
    assert rows["attn"] == {"kernel": "attn", "per_layer": 2, "us_per_layer": 10.0,
                            "outside": 0, "us_outside": 0.0}
    assert (rows["mlp"]["per_layer"], rows["mlp"]["us_per_layer"]) == (1, 7.5)
    assert (rows["head"]["per_layer"], rows["head"]["outside"], rows["head"]["us_outside"]) \
        == (0, 1, 40.0)
    assert [r["kernel"] for r in prof_fused.per_layer(every, one, 24)] == \
        ["attn", "mlp", "head", "embed"]


def test_markdown_has_the_profile_table():
    every, one = prof_fused.kernel_times(forward(24)), prof_fused.kernel_times(forward(1))
    row = {"ms_per_step": 0.5, "kernels_per_step": 74, "kernels_per_layer": 3.0,
           "kernel_us_per_step": 2.0 + 24 * 17.5 + 40, "roofline": 0.2,
           "profile": prof_fused.per_layer(every, one, 24)}
    out = {"device": "H200", "dtype": "bf16", "bandwidth_B_s": 4.8e12, "blocks": {},
           "sizes": {"0.5b": {"reference/n=1": row}}}
    md = prof_fused.markdown(out)
    assert "kernels' device time 462 µs of a 500 µs step (17.5 µs a layer" in md
    assert "| `attn` | 2.0 | 10.00 | 57 % | 0.0 | 0.00 |" in md
    assert "| `head` | 0.0 | 0.00 | 0 % | 1.0 | 40.00 |" in md


@pytest.mark.parametrize("argv, message", [
    (["--grid", "HOIST=a"], "--grid HOIST=a: NAME=INT"),
    (["--grid", "WARPS=4"], "--grid WARPS=4: NAME=INT"),
    (["--prefix", "0"], "--prefix 0: at least 1"),
    (["--set", "FOO=1"], "fused setting 'FOO=1'"),
])
def test_bad_arguments_are_named_before_the_gpu_check(monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(sys, "argv", ["prof_fused.py", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as exit_:
        prof_fused.main()
    assert message in str(exit_.value)


def test_an_int8_grid_is_ranked_on_the_int8_engine():
    """With --int8 the grid's combinations are ranked twice: on the bf16 fused engine
    ("ranking", which W8_ settings do not touch) and on the int8 engine ("ranking8")."""
    def row(a, n, speedup):
        return {"settings": {"W8_GEMV_BLOCK_K": a}, "n": n, "speedup": speedup,
                "ms_per_step": 1 / speedup}

    out = {"grid_axes": ["W8_GEMV_BLOCK_K=0,512"], "sizes": {"0.5b": {
        "grid": [row(0, 1, 2.01), row(512, 1, 2.0)],
        "grid8": [row(0, 1, 2.4), row(512, 1, 2.6)]}}}
    prof_fused.finish(out)
    assert [r["settings"]["W8_GEMV_BLOCK_K"] for r in out["ranking"]] == [0, 512]
    assert [r["settings"]["W8_GEMV_BLOCK_K"] for r in out["ranking8"]] == [512, 0]
    assert out["ranking8"][0]["geomean_speedup"] == pytest.approx(2.6)
    assert "ranking8" not in prof_fused.finish({"grid_axes": ["X=1"], "sizes": {
        "0.5b": {"grid": [row(0, 1, 2.0)]}}})
