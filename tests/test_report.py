"""Speed statistics of eval/bench reports: totals, paired ratios, load, summaries from records."""

import json
import math

import pytest

from cospec.cli import main
from cospec.report import in_turn, load_verdict, machine_load, median_ci, paired_speed


def rec(tokens: int, decode_s: float, prefill_s: float = 0.0, **kw) -> dict:
    return {"generated": tokens, "decode_s": decode_s, "prefill_s": prefill_s, **kw}


def test_a_stalled_prompt_weighs_by_its_time_and_barely_moves_the_median():
    # target: 10 tok/s on each of 3 prompts; the method: twice as fast on two, and stalled on
    # the third (100 tokens in 100 s). A mean of rates would say (20 + 20 + 1) / 3 / 10 = 1.37x.
    base = [rec(100, 10.0, 2.0), rec(100, 10.0, 2.0), rec(100, 10.0, 2.0)]
    mine = [rec(100, 5.0, 1.0), rec(100, 5.0, 1.0), rec(100, 100.0, 1.0)]
    got = paired_speed(list(zip(base, mine)))
    assert got["total_tokens"] == 300 and got["total_decode_s"] == 110.0
    assert got["tokens_per_s"] == pytest.approx(300 / 110)
    assert got["speedup"] == pytest.approx(30 / 110)            # 0.27x
    assert got["speedup_with_prefill"] == pytest.approx(36 / 113)
    assert got["ratio_median"] == pytest.approx(2.0)           # ratios 2, 2, 0.1
    assert got["ratio_iqr"] == pytest.approx([1.05, 2.0])      # inclusive quartiles
    assert got["ratio_n"] == 3 and all(math.isnan(x) for x in got["ratio_ci95"])


def test_ratios_pair_prompts_not_ranks():
    # 60 tokens per prompt; target 10, 40, 20, 30 tok/s; the method 3x, 0.5x, 2x, 2x of that
    # on the same prompt (30, 20, 40, 60 tok/s). Pairing sorted rates instead would give
    # ratios 1.5, 1.33, 1.5, 2 (median 1.5).
    base = [rec(60, 6.0), rec(60, 1.5), rec(60, 3.0), rec(60, 2.0)]
    mine = [rec(60, 2.0), rec(60, 3.0), rec(60, 1.5), rec(60, 1.0)]
    got = paired_speed(list(zip(base, mine)))
    assert got["ratio_median"] == pytest.approx(2.0)
    assert got["ratio_iqr"] == pytest.approx([1.625, 2.25])  # of 0.5, 2, 2, 3
    assert got["speedup"] == pytest.approx(12.5 / 7.5)       # 240 tokens in 12.5 s vs 7.5 s


def test_a_method_timed_whole_is_paired_with_prefill_added_to_both():
    """transformers' generate timed whole has its prefill inside decode_s (prefill_s 0):
    the same work in the same wall time must pair at 1, not at decode-only's 2/3."""
    base = [rec(60, 2.0, 1.0)] * 3
    whole = [rec(60, 3.0, 0.0)] * 3
    assert paired_speed(list(zip(base, whole)))["ratio_median"] == pytest.approx(2 / 3)
    got = paired_speed(list(zip(base, whole)), ratio_prefill=True)
    assert got["ratio_median"] == pytest.approx(1.0)
    assert got["speedup_with_prefill"] == pytest.approx(1.0)


def test_median_interval_is_the_exact_order_statistic_interval():
    # n = 10: P(Binomial(10, 1/2) <= 1) = 11/1024 per side, so the 95% interval of the median
    # runs from the 2nd to the 9th smallest value (coverage 97.9%).
    x = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 4.0, 6.0]
    assert median_ci(x) == (2.0, 9.0)
    assert all(math.isnan(v) for v in median_ci([1.0, 2.0, 3.0, 4.0, 5.0]))  # too few


def test_methods_take_turns_starting_a_prompt():
    """Over 2n prompts each of n methods runs first twice and directly after every other one
    at least once (a fixed or merely rotated order keeps each method's neighbour)."""
    assert in_turn(["target", "spd", "cospec"], 0) == ["target", "spd", "cospec"]
    assert in_turn(["target", "spd", "cospec"], 1) == ["cospec", "spd", "target"]
    assert in_turn(["target", "spd", "cospec"], 2) == ["spd", "cospec", "target"]
    assert in_turn([], 3) == []
    for n in range(1, 7):
        methods = [f"m{j}" for j in range(n)]
        turns = [in_turn(methods, i) for i in range(2 * n)]
        assert all(sorted(t) == methods for t in turns)
        assert sorted(t[0] for t in turns) == sorted(methods * 2)
        follows = {(t[j], t[j + 1]) for t in turns for j in range(n - 1)}
        assert follows == {(a, b) for a in methods for b in methods if a != b}


def test_load_above_the_core_count_is_flagged():
    def at(load1, load5):
        return {"load1": load1, "load5": load5, "load15": 0.5, "cpus": 2, "time": "t"}

    quiet = load_verdict([{"start": at(0.4, 1.2), "end": at(1.9, 1.6)}])
    assert not quiet["overloaded"] and quiet["peak_load"] == 1.9 and quiet["cpus"] == 2
    busy = [{"start": at(0.4, 1.2), "end": at(1.9, 1.6)}, {"start": at(0.3, 2.3), "end": at(1, 1)}]
    assert load_verdict(busy)["overloaded"]  # the second (resumed) pass ran beside others
    alone = load_verdict([{"start": at(1.9, 2.0), "end": at(2.14, 2.05)}])  # every core, alone
    assert not alone["overloaded"] and alone["peak_load"] == 2.14
    now = machine_load()
    assert now["cpus"] >= 1 and now["load1"] >= 0 and set(now) >= {"load5", "load15", "time"}


def make_folder(tmp_path, speed: dict, load: dict | None = None):
    """A finished bench folder written by hand: config, speed records, optional load file;
    the models it names do not exist, so summarizing it must not load them."""
    from cospec.tasks import get_task

    ids = [p.id for p in get_task("gsm8k").problems("dev")[:3]]
    cfg = {"task": "gsm8k", "split": "dev", "target": "/no/such/target",
           "draft": "/no/such/draft", "models": None, "k": 4, "max_new_tokens": 100,
           "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "no_chat": False,
           "methods": "target,spd", "limit": 3, "command": "cospec bench --task gsm8k"}
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=1))
    lines = []
    for i, pid in enumerate(ids):
        for m, (tokens, secs) in speed.items():
            lines.append(json.dumps({
                "id": pid, "method": m, "opts": {}, "token_ids": list(range(tokens)), "text": "",
                "peak_mem_gb": 1.0, "steps": 10, "accepted": 20 if m == "spd" else 0,
                "accepted_at": [], "arbiter_s": 0.0, "correct": False,
                **rec(tokens, secs[i], 1.0)}))
    (tmp_path / "speed.jsonl").write_text("\n".join(lines) + "\n")
    if load is not None:
        (tmp_path / "speed_load.json").write_text(json.dumps(load))
    return tmp_path


def test_summarize_rewrites_a_finished_folder_from_records_alone(tmp_path, capsys):
    speed = {"target": (50, [5.0, 5.0, 5.0]), "spd": (50, [2.5, 2.5, 50.0])}
    busy = {"load1": 3.5, "load5": 2.2, "load15": 1.0, "cpus": 2, "time": "t"}
    folder = make_folder(tmp_path, speed, {"start": busy, "end": busy})
    assert main(["summarize", str(folder)]) == 0
    got = json.loads((folder / "summary.json").read_text())["methods"]["spd"]
    assert got["speedup"] == pytest.approx(15 / 55)
    assert got["ratio_median"] == pytest.approx(2.0)
    assert got["tau"] == pytest.approx(3.0) and got["identical"] == 3
    report = (folder / "report.md").read_text()
    assert "| spd | 3 | 2.73 | 0.27x | 0.31x | 2.00x | 3 |" in report  # 150/55, 18/58
    assert "Warning: the machine's load exceeded its core count" in report
    assert "load not recorded" not in report


def test_summarize_says_when_load_was_not_recorded(tmp_path, capsys):
    folder = make_folder(tmp_path, {"target": (50, [5.0] * 3), "spd": (50, [4.0] * 3)})
    assert main(["summarize", str(folder)]) == 0
    report = (folder / "report.md").read_text()
    assert "load not recorded" in report and "Warning" not in report


def test_summarize_refuses_what_it_cannot_summarize(tmp_path, capsys):
    assert main(["summarize", str(tmp_path)]) == 2
    assert "not an eval/bench results folder" in capsys.readouterr().err
    folder = make_folder(tmp_path, {"target": (50, [5.0] * 3)})
    (folder / "accuracy.jsonl.gz").write_bytes(b"")
    assert main(["summarize", str(folder)]) == 2
    assert "gunzip accuracy.jsonl.gz first" in capsys.readouterr().err
