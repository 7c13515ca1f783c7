"""scripts/serve_step_sim.py runs end to end (in its own process: it stretches BatchEngine's
step for the whole process) and names a bad setting as a usage error."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]


def sim(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_step_sim.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_runs_and_reports():
    res = sim("--encode", "worker", "--step", "0.002", "--per-token", "0.0005", "--tokens", "4",
              COSPEC_RUN_AHEAD="2")
    assert res.returncode == 0, res.stderr[-2000:]
    line = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"encode worker step 2\.0 ms \+ 0\.5 ms a token, run-ahead 2, first "
                        r"early: first token p50 \d+ ms, latency p50 \d+ ms, \d+ tokens/s "
                        r"\(48 requests\)", line), line


def test_a_bad_setting_is_a_usage_error():
    res = sim("--encode", "own", COSPEC_RUN_AHEAD="0")
    assert res.returncode == 2 and "COSPEC_RUN_AHEAD='0'" in res.stderr
    assert "Traceback" not in res.stderr
