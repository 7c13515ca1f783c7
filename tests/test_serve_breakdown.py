"""scripts/serve_breakdown.py: the server's per-request split of a request's time, per level."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serve_breakdown.py"
_spec = importlib.util.spec_from_file_location("serve_breakdown", SCRIPT)
sb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sb)


def request(queue: float, prefill: float, decode: float, total: float, tokens: int) -> dict:
    return {"tokens": tokens, "metrics": {"queue_s": queue, "prefill_s": prefill,
                                          "decode_s": decode, "total_s": total}}


def test_medians_and_rest(tmp_path, monkeypatch, capsys):
    level = {"concurrency": 4, "summary": {"throughput_tokens_per_s": 900.0,
                                           "ttft_p50_s": 0.05},
             "requests": [request(0.010, 0.020, 0.200, 0.300, 100),   # rest 70 ms
                          request(0.030, 0.040, 0.100, 0.200, 50),    # rest 30 ms
                          request(0.020, 0.030, 0.300, 0.400, 150),   # rest 50 ms
                          {"tokens": 9, "metrics": None}]}            # a failed one: skipped
    got = sb.rows({"levels": [level]})
    assert len(got) == 1 and got[0]["requests"] == 3
    r = got[0]
    assert r["queue_ms"] == pytest.approx(20) and r["prefill_ms"] == pytest.approx(30)
    assert r["decode_ms_per_token"] == pytest.approx(1e3 * 0.6 / 300)
    assert r["rest_ms"] == pytest.approx(50) and r["ttft_p50_ms"] == pytest.approx(50)
    assert r["engine_step_share"] is None  # a run from before /health reported it
    path, later = tmp_path / "load_test.json", tmp_path / "later.json"
    path.write_text(json.dumps({"levels": [level]}))
    level["summary"]["engine_step_share"] = 0.625
    later.write_text(json.dumps({"levels": [level]}))
    monkeypatch.setattr(sys, "argv", ["serve_breakdown.py", f"own={path}", f"later={later}"])
    sb.main()
    out = capsys.readouterr().out
    assert "| own | 4 | 900 | 50 ms | 20.0 ms | 30.0 ms | 2.00 ms | 50 ms | — | 3 |" in out
    assert "| later | 4 | 900 | 50 ms | 20.0 ms | 30.0 ms | 2.00 ms | 50 ms | 62% | 3 |" in out


def test_a_peer_without_metrics_is_named(tmp_path, monkeypatch):
    path = tmp_path / "load_test.json"
    path.write_text(json.dumps({"levels": [{"concurrency": 1, "summary": {},
                                            "requests": [{"tokens": 5}]}]}))
    monkeypatch.setattr(sys, "argv", ["serve_breakdown.py", str(path)])
    with pytest.raises(SystemExit, match="no request carries"):
        sb.main()
