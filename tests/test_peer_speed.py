"""scripts/peer_speed.py's table on the CPU, from run files written here: each engine and
method at its fastest configuration over every file that holds the pair, and the ratios
against cospec's target-only and cospec's same method, prompt by prompt."""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "peer_speed.py"
_spec = importlib.util.spec_from_file_location("peer_speed", SCRIPT)
peer_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_speed)

MACHINE = {"load": [0.5, 0.5, 0.5], "cpus": 2, "gpu": "test GPU"}


def write_run(folder: Path, name: str, engine: str, method: str, configs: dict,
              **settings) -> None:
    """A run file as ``peer_speed.py run`` writes it; ``configs``: name -> seconds a prompt
    (10 tokens each, token ids [i] for prompt i); ``settings`` replace its ids, k,
    new_tokens."""
    runs = {n: {"per_prompt": [{"seconds": s, "tokens": 10, "token_ids": [i]}
                               for i, s in enumerate(secs)]}
            for n, secs in configs.items()}
    ids = [f"p{i}" for i in range(len(next(iter(configs.values()))))]
    (folder / name).write_text(json.dumps({
        "engine": engine, "method": method, "k": 5, "new_tokens": 10, "ids": ids,
        "configs": runs, "machine_start": MACHINE, "machine_end": MACHINE,
        "command": f"run {name}", **settings}))


@pytest.mark.parametrize("settings, message", [
    ({"ids": ["q0", "q1"]}, "vllm-target.json timed ids ['q0', 'q1'], cospec-target.json"),
    ({"new_tokens": 64}, "vllm-target.json timed new_tokens 64"),
])
def test_table_refuses_runs_of_other_prompts_or_lengths(tmp_path, capsys, settings, message):
    """Ratios pair prompts by position: runs of other prompts or token counts are refused."""
    write_run(tmp_path, "cospec-target.json", "cospec", "target", {"default": [1.0, 1.0]})
    write_run(tmp_path, "vllm-target.json", "vllm", "target", {"default": [1.0, 1.0]},
              **settings)
    with pytest.raises(SystemExit) as stop:
        peer_speed.cmd_table(argparse.Namespace(dir=str(tmp_path)))
    assert message in str(stop.value)
    assert not (tmp_path / "peers.json").exists()


def test_table_refuses_draft_methods_at_other_k_and_short_runs(tmp_path):
    write_run(tmp_path, "cospec-target.json", "cospec", "target", {"default": [1.0, 1.0]},
              k=4)  # target-only: its k is not read
    write_run(tmp_path, "cospec-spd.json", "cospec", "spd", {"default": [1.0, 1.0]})
    write_run(tmp_path, "vllm-spd.json", "vllm", "spd", {"default": [1.0, 1.0]}, k=3)
    with pytest.raises(SystemExit, match="draft methods timed at different k"):
        peer_speed.cmd_table(argparse.Namespace(dir=str(tmp_path)))
    (tmp_path / "vllm-spd.json").unlink()
    write_run(tmp_path, "vllm-spd.json", "vllm", "spd", {"default": [1.0]}, ids=["p0", "p1"])
    with pytest.raises(SystemExit, match=r"vllm-spd.json \(default\) timed 1 prompts of its 2"):
        peer_speed.cmd_table(argparse.Namespace(dir=str(tmp_path)))


def test_table_keeps_the_fastest_file_of_a_pair(tmp_path):
    write_run(tmp_path, "cospec-target.json", "cospec", "target", {"default": [1.0, 1.0]})
    write_run(tmp_path, "cospec-lookup.json", "cospec", "lookup", {"default": [0.5, 0.25]})
    # two files of one engine and method: the later file (by name) is the slower one
    write_run(tmp_path, "vllm-lookup-a.json", "vllm", "lookup", {"ngram_gpu": [0.5, 1.0]})
    write_run(tmp_path, "vllm-lookup-b.json", "vllm", "lookup", {"ngram": [2.0, 2.0]})
    peer_speed.cmd_table(argparse.Namespace(dir=str(tmp_path)))
    rows = {(r["engine"], r["method"]): r
            for r in json.loads((tmp_path / "peers.json").read_text())}
    assert set(rows) == {("cospec", "target"), ("cospec", "lookup"), ("vllm", "lookup")}
    vllm = rows[("vllm", "lookup")]
    assert vllm["config"] == "ngram_gpu" and vllm["tok_s"] == pytest.approx(20 / 1.5)
    assert vllm["all_configs"] == pytest.approx({"ngram_gpu": 20 / 1.5, "ngram": 5.0})
    assert vllm["vs_cospec_target"] == pytest.approx((20 / 1.5) / 10)
    assert vllm["paired_ratio_q1_median_q3"][1] == pytest.approx(statistics.median([2.0, 1.0]))
    assert vllm["cospec_vs_this"] == pytest.approx((20 / 0.75) / (20 / 1.5))
    assert vllm["cospec_vs_this_paired_q1_median_q3"][1] == pytest.approx(
        statistics.median([1.0, 4.0]))
    assert vllm["identical_to_cospec_target"] == 2
    md = (tmp_path / "peers.md").read_text()
    assert "| vllm | lookup | ngram_gpu | 2 | 13.3 |" in md


def test_vllm_ngram_choice_is_checked():
    run = subprocess.run([sys.executable, str(SCRIPT), "run", "--engine", "vllm", "--method",
                          "lookup", "--prompts", "p.json", "--out", "o.json", "--vllm-ngram",
                          "suffix"], capture_output=True, text=True)
    assert run.returncode == 2 and "--vllm-ngram: invalid choice: 'suffix'" in run.stderr


def test_vllm_ngram_elsewhere_is_refused():
    run = subprocess.run([sys.executable, str(SCRIPT), "run", "--engine", "cospec", "--method",
                          "lookup", "--prompts", "p.json", "--out", "o.json", "--vllm-ngram",
                          "ngram_gpu"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "--vllm-ngram: for --engine vllm --method lookup only" in run.stderr
