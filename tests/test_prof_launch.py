"""scripts/prof_launch.py on the CPU: the line fit, the table, bad arguments, and (under
triton's interpreter, one program: its grid barrier then never waits) the toy kernels reading
every element exactly once, with and without the prefetch."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prof_launch.py"
_spec = importlib.util.spec_from_file_location("prof_launch", SCRIPT)
prof_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof_launch)


def test_fit_recovers_a_line():
    t0, bw = 3.5, 4e12
    points = [(b, t0 + b / bw * 1e6) for b in (1e5, 1e6, 3e7, 2e8)]
    got_t0, got_bw = prof_launch.fit(points)
    assert got_t0 == pytest.approx(t0) and got_bw == pytest.approx(bw)


def test_markdown_lists_every_row():
    out = {"device": "GPU", "sms": 132,
           "launch": [{"programs": g, "us": 1.5} for g in (1, 132)],
           "stream": [{"block": 2048, "mb": 1, "us": 4.0, "gb_s": 262.0},
                      {"block": 2048, "mb": 8, "us": 6.0, "gb_s": 1398}],
           "stream_fit": [{"block": 2048, "t0_us": 3.7, "gb_s": 4100.0}],
           "persistent": [{"block": 2048, "prefetch": f, "reads": f == 1, "us": 480.0,
                           "us_layer": 20.0, "us_phase_over_floor": 2.0, "floor_us": 150.0}
                          for f in (0, 1)]}
    md = prof_launch.markdown(out)
    assert md.count("| store one value") == 2 and "| | 2048 | 8 | 6.00 | 1398 |" in md
    assert "t0 = 3.70 µs, bw = 4100 GB/s" in md and "| barriers alone | 2048 | 0 |" in md


def test_bad_reps_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--reps", "0"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "error: --reps 0: at least 1" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("prefetch", [0, 1])
def test_kernels_read_every_element_once(prefetch):
    pytest.importorskip("triton")
    _, stream, persistent = prof_launch.kernels()
    src = torch.arange(3 * 5000, dtype=torch.float32).to(torch.bfloat16)  # 15000 values
    sizes = torch.tensor([1000, 0, 3000, 800, 200], dtype=torch.int64)     # 5000 a layer
    out, cnt = torch.zeros(1), torch.zeros(1, dtype=torch.int32)
    persistent[(1,)](src, sizes, out, cnt, 15, BLOCK=64, PHASES=5, PREFETCH=prefetch)
    assert out.item() == pytest.approx(src.float().sum().item(), rel=1e-6)
    assert cnt.item() == 15                                  # one arrival a phase
    parts = torch.zeros(7)
    stream[(7,)](src, parts, 2176, 15000, BLOCK=64)
    assert parts.sum().item() == pytest.approx(src.float().sum().item(), rel=1e-6)
