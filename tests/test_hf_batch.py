"""scripts/hf_batch.py (transformers' batched generate, the peer of bench_batch.py) on a tiny
model on the CPU: the smoke path writes vllm_batch.py's JSON shape with every token counted,
and a left-padded group decodes each prompt as greedy decoding of it alone does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "hf_batch.py"
_spec = importlib.util.spec_from_file_location("hf_batch", SCRIPT)
hf_batch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_batch)

PROMPTS = [[5, 17, 33], [40, 2, 9, 61, 70, 12, 8], [90, 91], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


def test_tiny_smoke(tmp_path, monkeypatch):
    prompts, out = tmp_path / "prompts.json", tmp_path / "hf.json"
    prompts.write_text(json.dumps(PROMPTS + [[200, 300]]))  # ids beyond the tiny vocabulary
    monkeypatch.setattr(sys, "argv", ["hf_batch.py", "--tiny", "--prompts", str(prompts),
                                      "--out", str(out), "--new", "6", "--batches", "1,2,4"])
    hf_batch.main()
    report = json.loads(out.read_text())
    # the keys a table reads from vllm_batch.py's reports
    assert {"engine", "method", "new", "k", "prompts", "engine_start_s", "kwargs", "gpu",
            "load_start", "load_end", "command", "runs"} <= set(report)
    assert report["engine"] == "hf" and report["kwargs"]["cache_implementation"] == "static"
    assert [r["rows"] for r in report["runs"]] == [1, 2, 4]
    for r in report["runs"]:
        assert {"rows", "method", "generated", "wall_s", "tokens_per_s", "device_used_mb",
                "peak_mb"} <= set(r)
        assert r["generated"] == 5 * 6 and r["tokens_per_s"] > 0  # EOS ignored


def test_padded_group_is_each_prompt_greedy():
    """A group left-padded to a longer width (static cache) gives each prompt the tokens of
    greedy decoding of that prompt alone (no padding, dynamic cache)."""
    model = tiny_model(1, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, cache_implementation="static")
    got = hf_batch.decode(model, PROMPTS, 12, 0, kw).tolist()
    want = []
    for p in PROMPTS:
        x = torch.tensor([p])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=8, pad_token_id=0)
        want.append(y[0, len(p):].tolist())
    assert got == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_random_needs_a_gpu(tmp_path, monkeypatch, capsys):
    """``--random`` (bench_batch.py's random-weight target, built on CUDA) without a GPU is a
    usage error that says so, not a traceback."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    monkeypatch.setattr(sys, "argv", ["hf_batch.py", "--random", "1.5b", "--prompts",
                                      str(prompts), "--out", str(tmp_path / "hf.json")])
    with pytest.raises(SystemExit) as exc:
        hf_batch.main()
    assert exc.value.code == 2 and "CUDA GPU" in capsys.readouterr().err
