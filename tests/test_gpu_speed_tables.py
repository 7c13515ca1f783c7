"""scripts/gpu_speed.py's tables, on the CPU: the median and quartiles of the per-prompt
paired ratios to target-only, and ``--markdown`` remaking a run's table from its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_speed.py"
_spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
gpu_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_speed)


def rows(target: list[float], spd: list[float]) -> list[dict]:
    return [{"target": {"tok_s": t}, "spd": {"tok_s": s}} for t, s in zip(target, spd)]


def test_paired_ratios_are_per_prompt():
    """Each prompt's spd ÷ its own target; not the ratio of the medians (here 2.0)."""
    mid, q1, q3 = gpu_speed.paired(rows([100, 200, 400, 50, 10], [150, 220, 400, 100, 30]),
                                   "spd")
    # ratios 1.5, 1.1, 1.0, 2.0, 3.0 -> sorted 1.0, 1.1, 1.5, 2.0, 3.0
    assert (mid, q1, q3) == pytest.approx((1.5, 1.1, 2.0))
    assert gpu_speed.paired(rows([100], [130]), "spd") == pytest.approx((1.3, 1.3, 1.3))


def test_markdown_remade_from_json(tmp_path, monkeypatch):
    per_prompt = [{"target": {"tok_s": 100.0}, "spd": {"tok_s": 120.0}},
                  {"target": {"tok_s": 50.0}, "spd": {"tok_s": 75.0}}]
    summary = {"target": {"tokens": 300, "tok_s": 80.0, "vs_target": 1.0, "tau": 1.0},
               "spd": {"tokens": 300, "tok_s": 100.0, "vs_target": 1.25, "tau": 4.5,
                       "prefill_ms": 12.5}}
    res = {"device": "GPU", "command": "gpu_speed.py ...",
           "pair": {"task": "gsm8k", "temperature": 0.0, "prompts": 2, "k": 5,
                    "max_new_tokens": 256, "warmup_s": 1.0, "per_prompt": per_prompt,
                    "summary": summary}}
    (tmp_path / "gpu_speed.json").write_text(json.dumps(res))
    monkeypatch.setattr(sys, "argv", ["gpu_speed.py", "--out", str(tmp_path), "--markdown"])
    gpu_speed.main()
    table = (tmp_path / "gpu_speed.md").read_text()
    assert "| spd | 300 | 100.0 | 1.25× | 1.35× [1.27, 1.43] |" in table  # 1.2 and 1.5
    assert "| 4.50 | 12.5 |" in table and "| target | 300 | 80.0 | 1.00× |" in table
    assert table.split("| target |")[1].split("\n")[0].endswith("| 1.00 |  |")  # no prefill


def test_prefill_is_averaged_where_every_prompt_timed_it():
    """summary[name]["prefill_ms"]: the mean prefill a prompt, for the loops that time it
    (all prompts), and absent where a loop left it at 0."""
    per = [{"target": {"prefill_s": 0.010}, "spd": {"prefill_s": 0.020}, "we": {}},
           {"target": {"prefill_s": 0.030}, "spd": {"prefill_s": 0.0}, "we": {}}]
    assert gpu_speed.prefill_ms(per, "target") == pytest.approx(20.0)
    assert gpu_speed.prefill_ms(per, "spd") is None and gpu_speed.prefill_ms(per, "we") is None


def test_markdown_without_json_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_speed.py", "--out", str(tmp_path), "--markdown"])
    with pytest.raises(SystemExit) as stop:
        gpu_speed.main()
    assert stop.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_markdown_names_the_timed_runs_that_captured_a_graph(tmp_path, monkeypatch):
    """A run that captured a graph inside its timed window is named in the part's notes
    (prompt and method); a part where none did says none; one recorded before the flag
    existed says nothing."""
    def part(flags: list[bool] | None) -> dict:
        per = [{"target": {"tok_s": 100.0}, "spd": {"tok_s": 120.0}} for _ in range(2)]
        for row, flag in zip(per, flags or ()):
            row["target"]["captured"], row["spd"]["captured"] = False, flag
        summary = {m: {"tokens": 10, "tok_s": 1.0, "vs_target": 1.0, "tau": 1.0}
                   for m in ("target", "spd")}
        return {"task": "gsm8k", "temperature": 0.0, "prompts": 2, "k": 4,
                "max_new_tokens": 8, "warmup_s": 1.0, "per_prompt": per, "summary": summary}

    for flags, note in (([False, True], "captured a graph (their time includes it): spd on "
                                        "prompt 1"),
                        ([False, False], "captured a graph (their time includes it): none"),
                        (None, None)):
        res = {"device": "GPU", "command": "gpu_speed.py ...", "pair": part(flags)}
        (tmp_path / "gpu_speed.json").write_text(json.dumps(res))
        monkeypatch.setattr(sys, "argv", ["gpu_speed.py", "--out", str(tmp_path), "--markdown"])
        gpu_speed.main()
        table = (tmp_path / "gpu_speed.md").read_text()
        if note is None:
            assert "captured" not in table
        else:
            assert note in table


def test_capture_counters_see_block_graphs_and_engine_captures(monkeypatch):
    """``fast_block.captured_graphs`` counts the block graphs captured (not those made and
    not yet run); ``fast.capture_seconds`` sums every pooled engine's capture time."""
    import types
    import weakref

    from cospec import fast, fast_block

    class Key:  # weakly referable stand-ins for engines and models
        pass

    tgt, drf, model = Key(), Key(), Key()
    graphs = weakref.WeakKeyDictionary({tgt: weakref.WeakKeyDictionary({drf: {
        1: types.SimpleNamespace(graph=None), 2: types.SimpleNamespace(graph=object()),
        3: types.SimpleNamespace(graph=object())}})})
    monkeypatch.setattr(fast_block, "_GRAPHS", graphs)
    assert fast_block.captured_graphs() == 2
    free = weakref.WeakKeyDictionary({model: [types.SimpleNamespace(capture_s=0.5),
                                              types.SimpleNamespace(capture_s=0.25)]})
    monkeypatch.setattr(fast, "_FREE", free)
    assert fast.capture_seconds() == pytest.approx(0.75)
