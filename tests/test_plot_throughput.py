"""scripts/plot_throughput.py: each kind of result file becomes its series, table and plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_throughput.py"
_spec = importlib.util.spec_from_file_location("plot_throughput", SCRIPT)
pt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pt)


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_series_table_and_plot(tmp_path, monkeypatch, capsys):
    ours = write(tmp_path / "bench_batch.json", {"runs": [
        {"rows": 1, "method": "target", "tokens_per_s": 388.2},
        {"rows": 16, "method": "target", "tokens_per_s": 5160.4},
        {"rows": 1, "method": "spd", "tokens_per_s": 414.3}]})
    peer = write(tmp_path / "vllm-spd.json", {"engine": "vllm", "runs": [
        {"rows": 16, "method": "spd", "tokens_per_s": 6896.0}]})
    served = write(tmp_path / "load_test.json", {
        "config": {"label": "cospec serve target", "url": None},
        "levels": [{"concurrency": c, "summary": {"throughput_tokens_per_s": t}}
                   for c, t in ((1, 300.0), (64, 9000.0))]})
    assert pt.read(ours) == ("offline", {"cospec target": {1: 388.2, 16: 5160.4},
                                         "cospec spd": {1: 414.3}})
    assert pt.read(served) == ("served", {"cospec serve target": {1: 300.0, 64: 9000.0}})
    monkeypatch.setattr(sys, "argv", ["plot_throughput.py", "--out", str(tmp_path / "out"),
                                      str(ours), str(peer), str(served)])
    pt.main()
    md = (tmp_path / "out" / "throughput.md").read_text()
    assert "| B | cospec target | cospec spd | vllm spd |" in md
    assert "| 16 | 5,160 | — | 6,896 |" in md
    assert "| 64 | 9,000 |" in md
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 1000
    capsys.readouterr()


def test_missing_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["plot_throughput.py", "--out", str(tmp_path),
                                      str(tmp_path / "nope.json")])
    with pytest.raises(SystemExit):
        pt.main()
    assert "no such file" in capsys.readouterr().err


def test_two_runs_with_one_label_are_named_apart(tmp_path, monkeypatch, capsys):
    """NAME=FILE names a served series; two runs that share a --label and no NAME are refused
    (the second would silently replace the first)."""
    def served(name: str, tps: float) -> Path:
        return write(tmp_path / f"{name}.json", {
            "config": {"label": "cospec serve target", "url": None},
            "levels": [{"concurrency": 1, "summary": {"throughput_tokens_per_s": tps}}]})

    a, b = served("a", 300.0), served("b", 400.0)
    out = str(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["plot_throughput.py", "--out", out, str(a), str(b)])
    with pytest.raises(SystemExit):
        pt.main()
    assert "already plotted" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["plot_throughput.py", "--out", out, f"in-process={a}",
                                      f"own process={b}"])
    pt.main()
    assert "| 1 | 300 | 400 |" in (tmp_path / "out" / "throughput.md").read_text()
    capsys.readouterr()
