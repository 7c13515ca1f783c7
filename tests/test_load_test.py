"""scripts/load_test.py: its per-level summaries and the requests each level sends."""

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


def test_waves_lengthen_the_many_client_levels(monkeypatch):
    """With --waves W a level of c clients sends max(--requests, W·c) requests, the first of
    one plan sized for the largest level; without it every level sends --requests."""
    args = lt.argparse.Namespace(requests=128, waves=8, concurrency=[1, 4, 16, 64], seed=0,
                                 malformed=0.1, disconnect=0.0, slow=0.0, plain=True,
                                 methods="target", k=(4, 4), warm_up=False)
    reqs = lt.plan(args, "m", 2048)
    assert len(reqs) == 512 and sum(r["kind"] == "malformed" for r in reqs) == 51
    sent = []

    async def run(a, url, some, model):
        sent.append([r["i"] for r in some])
        return [{"outcome": "ok"}], 1.0

    monkeypatch.setattr(lt, "run", run)
    monkeypatch.setattr(lt, "idle_health", lambda url: {})
    monkeypatch.setattr(lt, "summarize", lambda *a: {"lost": 0, "mismatched": 0,
                                                     "server_errors_5xx": 0})
    monkeypatch.setattr(lt.httpx, "post", lambda *a, **kw: lt.argparse.Namespace(
        status_code=200, text=""))
    levels, failures = lt.sweep(args, "http://x", reqs, "m")
    assert not failures and [len(s) for s in sent] == [128, 128, 128, 512, 1]
    assert sent[3][:128] == sent[0] == list(range(128))
    args.waves = 0
    assert len(lt.plan(args, "m", 2048)) == 128


def test_spec_off_share_counts_lookup_requests_too():
    """The summary's τ and target-only share cover every method --spec-off-at turns off
    (spd and prompt lookup), not target-only requests."""
    def rec(method, tau, off):
        return {"outcome": "ok", "kind": "ok", "method": method, "latency_s": 0.1,
                "tokens": 8, "metrics": {"tau": tau, "speculation_off": off}}

    recs = [rec("spd", 4.0, False), rec("lookup", 2.0, False), rec("lookup", 1.0, True),
            rec("target", 1.0, False)]
    s = lt.summarize(recs, 2.0, {}, [])
    assert s["spd_off_share"] == pytest.approx(1 / 3) and s["spd_mean_tau"] == 3.0
    assert s["throughput_tokens_per_s"] == 16.0
