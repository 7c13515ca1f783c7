"""scripts/load_test.py's share of a level's wall time that the server's worker stepped."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
_spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
lt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lt)


def test_busy_shares_from_health():
    """The shares come from the /health counters' growth over the level's wall time; a
    server without them (vLLM) gets none, not zeros."""
    before = {"engine_step_s": 1.0, "batch_worker_s": 1.5, "completed": 3}
    after = {"engine_step_s": 2.5, "batch_worker_s": 3.5, "completed": 9}
    assert lt.busy(before, after, 2.0) == {"engine_step_share": 0.75,
                                           "batch_worker_share": 1.0}
    assert lt.busy({}, {}, 2.0) == {} and lt.busy(before, {"completed": 9}, 2.0) == {}
