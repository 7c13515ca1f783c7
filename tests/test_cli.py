"""The command line on tiny saved models: output, JSON, resumable eval, clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from cospec.cli import main
from cospec.errors import CospecError


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cospec", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def models(tiny_dirs):
    t, d = tiny_dirs
    return ["--target", str(t), "--draft", str(d)]


def test_generate_json_spd_equals_target(tiny_dirs, capsys):
    """spd equals the target with an unrelated draft, and with the target as its own draft
    (its own weights, not generate's default int8 copies) it speculates: every draft
    accepted, k + 1 tokens per target pass."""
    t, d = tiny_dirs
    outs = {}
    for name, method, draft in (("target", "target", d), ("spd", "spd", d), ("self", "spd", t)):
        assert main(["generate", "--target", str(t), "--draft", str(draft), "--method", method,
                     "--prompt", "w5 w9 w12", "--no-chat", "--max-new-tokens", "20", "--k", "4",
                     "--draft-weights", "model", "--json"]) == 0
        outs[name] = json.loads(capsys.readouterr().out)
    assert outs["spd"]["token_ids"] == outs["target"]["token_ids"] == outs["self"]["token_ids"]
    assert outs["spd"]["stats"]["generated"] == len(outs["spd"]["token_ids"])
    st = outs["self"]["stats"]
    assert st["drafted"] > 0 and st["accepted"] == st["drafted"]
    assert st["steps"] == -(-st["generated"] // 5) and st["steps"] < st["generated"]


def test_generate_defaults_to_spd_staged_with_the_targets_tokens(tiny_dirs, capsys):
    """Without --method, generate decodes with spd-staged (spd whose draft checks the prompt
    lookup's guesses): the target's greedy tokens, and with the target as its own draft
    (its own weights) every proposal accepted, on a prompt whose n-grams repeat (guesses
    to check)."""
    t, d = tiny_dirs
    common = ["--prompt", "w5 w9 w12 w5 w9 w12 w5", "--no-chat", "--max-new-tokens", "24",
              "--k", "4", "--draft-weights", "model", "--json"]
    outs = {}
    for name, method, draft in (("target", ["--method", "target"], d), ("default", [], d),
                                ("self", [], t)):
        assert main(["generate", "--target", str(t), "--draft", str(draft), *method,
                     *common]) == 0
        outs[name] = json.loads(capsys.readouterr().out)
    assert outs["default"]["method"] == outs["self"]["method"] == "spd-staged"
    assert outs["default"]["token_ids"] == outs["target"]["token_ids"]
    assert outs["self"]["token_ids"] == outs["target"]["token_ids"]
    st = outs["self"]["stats"]
    assert st["drafted"] > 0 and st["accepted"] == st["drafted"]


def test_generate_with_prompt_lookup_needs_no_draft(tiny_dirs, capsys):
    """``--method lookup`` runs on the target alone (no --draft) and gives target-only's
    tokens; ``spd-lookup`` takes the draft too."""
    t, d = tiny_dirs
    common = ["--prompt", "w5 w9 w12 w5 w9 w12 w5", "--no-chat", "--max-new-tokens", "24",
              "--k", "4", "--json"]
    outs = {}
    for method, draft in (("target", []), ("lookup", []), ("spd-lookup", ["--draft", str(d)])):
        assert main(["generate", "--target", str(t), *draft, "--method", method, *common]) == 0
        outs[method] = json.loads(capsys.readouterr().out)
    assert outs["lookup"]["token_ids"] == outs["target"]["token_ids"]
    assert outs["spd-lookup"]["token_ids"] == outs["target"]["token_ids"]
    assert outs["lookup"]["stats"]["drafted"] > 0


def test_generate_with_an_int8_draft_on_the_cpu(tiny_dirs, capsys):
    """``--draft-weights int8 --device cpu``: spd speculates with the int8 draft and its
    tokens are the target-only run's."""
    outs = {}
    for method, weights in (("target", "model"), ("spd", "int8")):
        assert main(["generate", *models(tiny_dirs), "--method", method, "--draft-weights",
                     weights, "--device", "cpu", "--prompt", "w5 w9 w12", "--no-chat",
                     "--max-new-tokens", "20", "--k", "4", "--json"]) == 0
        outs[method] = json.loads(capsys.readouterr().out)
    assert outs["spd"]["token_ids"] == outs["target"]["token_ids"]
    assert outs["spd"]["stats"]["drafted"] > 0


def test_generate_prints_characters_split_between_tokens_whole(tiny_dirs, capsys, monkeypatch):
    """Streamed text equals the whole output's decode where a multi-byte character is split
    between tokens (each byte a token of the tiny byte-level tokenizer) and where the output
    ends inside one: a split character is printed once whole, never as "\ufffd"."""
    from transformers import AutoTokenizer

    from cospec import generate_cmd
    from cospec.decoding import Token

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs[0]))
    text = "caf\u00e9 \u4e16\u754c ok \U0001f600"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # characters split: the case tested
    for out_ids in (ids, ids[:-1]):  # whole, and cut inside the last character
        class Fixed:
            def stream(self, *args, ids=out_ids, **kw):
                return iter(Token(i, False) for i in ids)

        monkeypatch.setattr(generate_cmd, "build_method", lambda *a: Fixed())
        assert main(["generate", *models(tiny_dirs), "--prompt", "w5", "--no-chat"]) == 0
        assert capsys.readouterr().out == tok.decode(out_ids, skip_special_tokens=True)


@pytest.mark.parametrize("method, flags, note", [
    ("spd", ["--lambda", "0.3"],
     "note: --lambda is read by we, we-sd, cos-we only; spd ignores it"),
    ("cos-cd", ["--threshold", "0.4", "--mu", "0.5"],
     "note: --threshold is read by cospec, confidence, entropy only; cos-cd ignores it"),
    ("target", ["--first-mismatch-only"], "note: --first-mismatch-only is read by cospec,"),
])
def test_generate_notes_a_flag_its_method_does_not_read(tiny_dirs, capsys, method, flags, note):
    """A decoding flag the method ignores (--lambda with spd: spd is decoded, not an
    ensemble) is named on stderr; one it reads (--mu with cos-cd) is not."""
    assert main(["generate", *models(tiny_dirs), "--method", method, "--prompt", "w5 w9",
                 "--no-chat", "--max-new-tokens", "4", "--json", *flags]) == 0
    err = capsys.readouterr().err
    assert note in err and err.count("note:") == 1


def test_eval_notes_a_flag_none_of_its_methods_reads(tiny_dirs, tmp_path, capsys):
    """eval names a decoding flag none of --methods reads, before loading anything; a flag
    one of them reads is not named."""
    assert main(["eval", *models(tiny_dirs), "--methods", "target,spd,cd", "--mu", "0.3",
                 "--delta", "0.2", "--task", "nope", "--out", str(tmp_path / "run")]) == 2
    # (it stops at the unknown task, after the notes)
    err = capsys.readouterr().err
    assert "note: --delta is read by confidence only; target, spd, cd ignore it" in err
    assert "--mu" not in err


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method"),
    (["--k", "0"], "must be > 0"),
    (["--prompt", "   "], "empty prompt"),
    (["--target", "/no/such/model"], "model not found"),
    (["--top-k", "-3"], "must be >= 0"),
    (["--method", "cospec", "--threshold", "2"], "must be in [0, 1]"),
    (["--device", "tpu"], "unknown device"),
    (["--method", "cospec", "--arbiter", "/no/such/arbiter"], "arbiter file not found"),
    (["--method", "cospec", "--arbiter", __file__], "not a readable arbiter file"),
    pytest.param(["--device", "cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    (["--draft-weights", "int4"], "invalid choice: 'int4'"),
    (["--method", "cd", "--mu", "inf"], "must be in [0, 100], got inf"),
    (["--method", "cd", "--mu", "1e300"], "must be in [0, 100], got 1e300"),
    (["--method", "we", "--weights", "nan,nan"], "--weights must be finite numbers"),
    (["--method", "we", "--weights", "nan,1"], "--weights must be finite numbers"),
    (["--method", "we", "--weights", "-1,2"], "ensemble weights must be >= 0 and sum to 1"),
    (["--temperature", "nan"], "must be a finite number >= 0, got nan"),
    (["--seed", str(2**64)], "must be in [-2^63, 2^63)"),
    (["--prompt", "hello " * 600], "context of 512 positions"),
])
def test_generate_bad_input_is_a_clear_error(tiny_dirs, args, message):
    base = {"--prompt": "w5 w6", "--method": "spd"}
    argv = ["generate", *models(tiny_dirs), "--no-chat"]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    res = cli(*argv, *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("name, value, message", [
    ("COSPEC_PREFILL", "fast", "COSPEC_PREFILL='fast': use one of eager, compiled, graphs"),
    ("COSPEC_FUSED", "yes", "COSPEC_FUSED='yes'"),
    ("COSPEC_LINEAR", "fastest", "COSPEC_LINEAR='fastest'"),
    ("COSPEC_COMPILE_PREFILL", "1", "replaced by COSPEC_PREFILL"),
    ("COSPEC_RUN_AHEAD", "9", "COSPEC_RUN_AHEAD='9': use one of 1, 2, 3, 4, 5, 6, 7, 8"),
    ("COSPEC_BLOCK_GRAPH", "yes", "COSPEC_BLOCK_GRAPH='yes': use one of 0, 1"),
    ("COSPEC_SPD_BLOCK", "on", "COSPEC_SPD_BLOCK='on': use one of 0, 1"),
])
def test_a_bad_setting_is_named_at_start(tiny_dirs, monkeypatch, capsys, name, value, message):
    """A bad COSPEC_* value stops the command before it loads anything, also where the run
    would never read that setting (a CPU generate reads neither COSPEC_PREFILL nor
    COSPEC_FUSED)."""
    monkeypatch.setenv(name, value)
    assert main(["generate", *models(tiny_dirs), "--no-chat", "--prompt", "w5"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_mismatched_vocabularies_are_refused(tmp_path, tiny_dirs):
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", 3, vocab=280)
    res = cli("generate", "--target", tiny_dirs[0], "--draft", other, "--prompt", "w5",
              "--no-chat")
    assert res.returncode == 2 and "different vocabularies" in res.stderr
    assert "Traceback" not in res.stderr


def test_verify_cost_times_every_linear_mode(tiny_dirs, tmp_path):
    assert main(["verify-cost", *models(tiny_dirs), "--ks", "1,2", "--reps", "1",
                 "--prefix", "8", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "verify_cost.json").read_text())
    assert set(res["models"]) == {str(d) for d in tiny_dirs}
    for per_k in res["models"].values():
        assert {"auto", "plain", "weight-first"} <= set(per_k["2"])
    assert "weight-first ÷ k=1" in (tmp_path / "verify_cost.md").read_text()
    assert res["best_k"]["0.9"]["k"] == 1  # only 1 and 2 tokens were timed


FLAT = {n: 1.0 for n in range(1, 9)}               # verifying 8 tokens costs one step
CLIFF = FLAT | {n: 2.0 for n in range(4, 9)}       # 4+ tokens cost two steps
XEON = {1: 0.177, 2: 0.321, 3: 0.35, 4: 0.369, 5: 0.372, 6: 0.375, 7: 0.376, 8: 0.377}


def simulate(target_s: dict[int, float], draft_s: float, alpha: float, k: int) -> float:
    """Tokens per second of SPD with draft length k, by simulating 200,000 blocks: each draft
    token is accepted with probability alpha until the first rejection; a block commits the
    accepted drafts + 1 token and costs k draft steps + a verify over k + 1 tokens."""
    import numpy as np

    rng = np.random.default_rng(k)
    # rejections are "successes" of a geometric: accepted = trials before the first one
    accepted = np.minimum(rng.geometric(1 - alpha, 200_000) - 1, k)
    return (accepted + 1).sum() / (200_000 * (k * draft_s + target_s[k + 1]))


@pytest.mark.parametrize("target_s, draft_s, alpha, want_k", [
    (FLAT, 0.01, 0.9, 7),    # verifying is free and drafting nearly so: draft as far as timed
    (CLIFF, 0.3, 0.9, 2),    # k = 2: 2.71 tokens per 1.6 s; k = 3 pays the cliff (2.9 s)
    (CLIFF, 0.3, 0.2, 1),    # rarely accepted: one draft at most
    (XEON, 0.06, 0.85, None),  # the verify costs measured on a Xeon (DESIGN.md)
])
def test_best_k_matches_a_simulation(target_s, draft_s, alpha, want_k):
    from cospec.k_auto import best_k

    k, speedup = best_k(target_s, draft_s, alpha)
    sim = {n: simulate(target_s, draft_s, alpha, n) for n in range(1, max(target_s))}
    assert k == want_k or want_k is None  # None: k = 5 and 6 within 1% of each other
    assert sim[k] >= 0.99 * max(sim.values())
    assert speedup == pytest.approx(sim[k] * target_s[1], rel=0.01)


def test_k_auto_picks_the_predicted_length_and_times_once(tiny_dirs, tmp_path, monkeypatch,
                                                          capsys):
    from cospec import k_auto

    monkeypatch.setenv("COSPEC_CACHE", str(tmp_path))
    timed = []

    def cost(model, n, prefix, reps, mode):  # 4+ tokens cost two steps (the Xeon's cliff)
        timed.append(n)
        if model.config.num_hidden_layers == 1:  # the tiny draft
            return 0.3
        return 1.0 if n <= 3 else 2.0

    monkeypatch.setattr(k_auto, "forward_cost", cost)
    outs = []
    for _ in range(2):
        assert main(["generate", *models(tiny_dirs), "--method", "spd", "--k", "auto",
                     "--draft-weights", "model", "--prompt", "w5 w9 w12", "--no-chat",
                     "--max-new-tokens", "20", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["k"] == 2 == outs[1]["k"]  # best_k on these costs at alpha 0.85
    assert len(timed) == len(k_auto.AUTO_KS) + 1  # timed once: the second run read the cache
    assert outs[0]["token_ids"] == outs[1]["token_ids"]
    assert main(["generate", *models(tiny_dirs), "--method", "spd", "--k", "auto",
                 "--draft-weights", "int8", "--device", "cpu", "--prompt", "w5 w9 w12",
                 "--no-chat", "--max-new-tokens", "20", "--json"]) == 0
    assert len(timed) == 2 * (len(k_auto.AUTO_KS) + 1)  # an int8 draft is timed on its own


def test_folders_made_before_dtype_and_draft_weights_were_recorded_stay_resumable(tmp_path):
    """A folder whose config.json predates the dtype and draft-weights keys resumes with the
    draft's own weights at any dtype (neither was recorded then), and refuses an int8 draft;
    a folder that records them refuses another value."""
    from argparse import Namespace

    from cospec.evaluate import IDENTITY, RunDir, _config

    base = dict.fromkeys(IDENTITY) | {"methods": "target,spd", "limit": None, "device": "cpu",
                                      "draft_weights": "model"}
    old = {k: v for k, v in _config(Namespace(**base)).items()
           if k not in ("dtype", "draft_weights")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    RunDir(tmp_path, _config(Namespace(**base | {"dtype": "bfloat16"})))
    with pytest.raises(CospecError, match="draft_weights: 'model' -> 'int8'"):
        RunDir(tmp_path, _config(Namespace(**base | {"draft_weights": "int8"})))
    new = _config(Namespace(**base))
    assert new["dtype"] == "float32" and new["draft_weights"] == "model"
    (tmp_path / "config.json").write_text(json.dumps(new))
    with pytest.raises(CospecError, match="dtype: 'float32' -> 'bfloat16'"):
        RunDir(tmp_path, _config(Namespace(**base | {"dtype": "bfloat16"})))


def test_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"junk")
    res = cli("generate", "--target", f, "--draft", f, "--prompt", "hi")
    assert res.returncode == 2 and "not a .gguf" in res.stderr
    g = tmp_path / "weights.gguf"
    g.write_bytes(b"junk" * 8)
    res = cli("generate", "--target", g, "--draft", g, "--prompt", "hi")
    assert res.returncode == 2 and "is not a GGUF file" in res.stderr
    assert "Traceback" not in res.stderr


def test_eval_is_resumable_and_refuses_other_configs(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    common = ["eval", *models(tiny_dirs), "--task", "gsm8k", "--split", "dev", "--limit", "3",
              "--max-new-tokens", "8", "--batch-size", "2", "--out", out]
    assert main([*map(str, common), "--methods", "target,draft,spd",
                 "--speed-subset", "2"]) == 0
    lines = (out / "accuracy.jsonl").read_text().splitlines()
    assert len(lines) == 9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["spd"]["identical"] == 2
    assert (out / "report.md").exists() and (out / "accuracy_vs_speedup.png").exists()
    # rerun: nothing is redone, nothing duplicated
    assert main([*map(str, common), "--methods", "target,draft,spd",
                 "--speed-subset", "2"]) == 0
    assert len((out / "accuracy.jsonl").read_text().splitlines()) == 9
    assert len((out / "speed.jsonl").read_text().splitlines()) == 6
    res = cli(*[c if c != "8" else "9" for c in map(str, common)])
    assert res.returncode == 2 and "another configuration" in res.stderr
    config = (out / "config.json").read_text()
    for flags, key in ((["--dtype", "bfloat16"], "dtype: 'float32' -> 'bfloat16'"),
                       (["--draft-weights", "int8"], "draft_weights: 'model' -> 'int8'")):
        res = cli(*map(str, common), "--methods", "target,spd", *flags)
        assert res.returncode == 2 and key in res.stderr
    # a lossy method's other options, refused after loading: nothing of the run is written
    lossy = [*map(str, common), "--methods", "target,confidence", "--speed-subset", "1"]
    assert main([*lossy, "--delta", "0.1"]) == 0
    config = (out / "config.json").read_text()
    lines = {f: (out / f).read_text() for f in ("accuracy.jsonl", "speed.jsonl")}
    res = cli(*lossy, "--delta", "0.3", "--limit", "4")
    assert res.returncode == 2 and "other options" in res.stderr
    assert (out / "config.json").read_text() == config
    assert lines == {f: (out / f).read_text() for f in lines}


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task"),
    (["--task", "gsm8k", "--split", "train"], "no split"),
    (["--task", "gsm8k", "--limit", "0"], "--limit must be > 0"),
    (["--task", "gsm8k", "--batch-size", "0"], "must be > 0"),
    (["--task", "gsm8k", "--speed-subset", "-1"], "must be >= 0"),
    (["--task", "gsm8k", "--split", "dev", "--limit", "1", "--methods", "target",
      "--out", "/dev/null/x"], "--out /dev/null/x: /dev/null is not a folder"),
    (["--task", "gsm8k", "--methods", " , "], "--methods ' , ' names no method"),
    (["--task", "gsm8k", "--methods", "target,spd, spd"], "--methods names spd more than once"),
])
def test_eval_bad_input(tiny_dirs, tmp_path, args, message):
    out = [] if "--out" in args else ["--out", tmp_path / "x"]
    res = cli("eval", *models(tiny_dirs), *args, *out)
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()  # a refused run leaves no folder to refuse the next


def test_a_malformed_results_config_is_a_clear_error(tiny_dirs, tmp_path):
    (tmp_path / "config.json").write_text("{cut")
    res = cli("eval", *models(tiny_dirs), "--task", "gsm8k", "--limit", "1", "--out", tmp_path)
    assert res.returncode == 2 and "config.json is not valid JSON" in res.stderr
    assert "Traceback" not in res.stderr


def test_collect_refuses_evaluation_data(tiny_dirs, tmp_path):
    res = cli("collect", *models(tiny_dirs), "--task", "gsm8k", "--split", "heldout",
              "--out", tmp_path / "c")
    assert res.returncode == 2 and "kept for evaluation" in res.stderr


def test_collect_train_and_cospec_end_to_end(tiny_dirs, tmp_path):
    data = tmp_path / "div"
    args = ["collect", *models(tiny_dirs), "--task", "gsm8k", "--split", "dev", "--limit", "4",
            "--max-new-tokens", "12", "--shard-size", "2", "--batch-size", "4", "--out", data]
    assert main(list(map(str, args))) == 0
    shards = sorted(data.glob("shard-*.jsonl.gz"))
    assert len(shards) == 2
    before = [s.read_bytes() for s in shards]
    assert main(list(map(str, args))) == 0  # resume: nothing redone
    assert [s.read_bytes() for s in sorted(data.glob("shard-*.jsonl.gz"))] == before
    from cospec.collect import read_points

    pts = read_points([data])
    assert pts and len({(p["id"], p["position"]) for p in pts}) == len(pts)
    arb = tmp_path / "arb.safetensors"
    assert main(["train", "--data", str(data), "--out", str(arb), "--epochs", "5",
                 "--val-fraction", "0.5"]) == 0
    assert main(["generate", *models(tiny_dirs), "--method", "cospec", "--arbiter", str(arb),
                 "--prompt", "w5 w6", "--no-chat", "--max-new-tokens", "10", "--json"]) == 0


def test_cos_methods_through_generate_and_eval(tiny_dirs, capsys, tmp_path):
    outs = {}
    for method in ("we", "we-sd", "cos-we", "cd", "cd-sd", "cos-cd"):
        assert main(["generate", *models(tiny_dirs), "--method", method, "--prompt",
                     "w5 w9 w12", "--no-chat", "--max-new-tokens", "16", "--json",
                     "--lambda", "0.3"]) == 0
        outs[method] = json.loads(capsys.readouterr().out)["token_ids"]
    assert outs["cos-we"] == outs["we-sd"] == outs["we"] != outs["cd"]
    assert outs["cos-cd"] == outs["cd-sd"] == outs["cd"]
    out = tmp_path / "cos"
    assert main(["eval", *models(tiny_dirs), "--task", "gsm8k", "--split", "dev", "--limit",
                 "2", "--max-new-tokens", "8", "--methods", "we,cos-we,we-sd",
                 "--speed-subset", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["we"]["batched_agreement"] == 1.0
    recs = [json.loads(x) for x in (out / "speed.jsonl").read_text().splitlines()]
    by = {(r["id"], r["method"]): r["token_ids"] for r in recs}
    assert all(by[(i, "cos-we")] == by[(i, "we-sd")] == by[(i, "we")] for i, m in by if m == "we")
    assert summary["methods"]["we-sd"]["identical"] == 2  # compared with `we`, its base


def test_three_models_through_the_cli(tiny_dirs, capsys, tmp_path):
    """--models A,B,C: CoS over three models; cos-we equals we; bad weights are refused."""
    from tiny import save_tiny

    t, d = tiny_dirs
    mid = save_tiny(tmp_path / "mid", 3, layers=1)
    spec = ["--models", f"{d},{mid},{t}", "--prompt", "w5 w9 w12", "--no-chat",
            "--max-new-tokens", "12", "--json", "--weights", "0.2,0.3,0.5"]
    outs = {}
    for method in ("we", "cos-we", "we-sd"):
        assert main(["generate", *spec, "--method", method]) == 0
        outs[method] = json.loads(capsys.readouterr().out)["token_ids"]
    assert outs["cos-we"] == outs["we-sd"] == outs["we"]
    assert main(["generate", *spec[:-1], "0.5,0.5", "--method", "we"]) == 2
    assert "3 models but 2 weights" in capsys.readouterr().err
    assert main(["generate", *spec, "--method", "spd"]) == 2
    assert "CoS methods" in capsys.readouterr().err
    assert main(["generate", *spec]) == 2  # the default method (spd-staged) takes two models
    assert "CoS methods" in capsys.readouterr().err


def test_refine_runs_resumes_and_refuses_evaluation_data(tiny_dirs, tmp_path):
    """On-policy refinement from an arbiter: runs on tiny models (a speed bonus gives the
    groups a signal), resumes after its last finished iteration, refuses evaluation splits."""
    from cospec.arbiter import FEATURES, LearnedPolicy, arbiter_info, load_arbiter, save_arbiter

    start = tmp_path / "start.safetensors"
    save_arbiter(LearnedPolicy(len(FEATURES), hidden_units=4), start,
                 (str(tiny_dirs[0]), str(tiny_dirs[1])))
    out = tmp_path / "refined"
    args = ["refine", *models(tiny_dirs), "--arbiter", start, "--task", "gsm8k", "--split",
            "dev", "--limit", "3", "--problems", "2", "--group", "2", "--max-new-tokens", "8",
            "--speed-bonus", "0.5", "--lr", "0.01", "--out", out]
    assert main(list(map(str, args + ["--iterations", "2"]))) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [0, 1] and log[0]["decisions"] > 0
    assert main(list(map(str, args + ["--iterations", "3"]))) == 0  # resumes: one more
    hist = json.loads(arbiter_info(out / "arbiter.safetensors")["info"])["refine_history"]
    assert [r["iteration"] for r in hist] == [0, 1, 2] and hist[:2] == log
    assert load_arbiter(out / "arbiter.safetensors").threshold == 0.5
    res = cli(*args, "--iterations", "4", "--lr", "0.02")  # resume with other settings
    assert res.returncode == 2 and "other settings (lr)" in res.stderr
    res = cli(*args, "--split", "heldout", "--out", tmp_path / "x")
    assert res.returncode == 2 and "kept for evaluation" in res.stderr
    res = cli(*args, "--group", "1")
    assert res.returncode == 2 and "--group must be >= 2" in res.stderr
    res = cli(*args, "--problems", "0")
    assert res.returncode == 2 and "--problems must be >= 1" in res.stderr
    res = cli(*args, "--lr", "0")
    assert res.returncode == 2 and "--lr must be > 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_refine_with_a_speed_bonus_learns_to_keep_draft_tokens(tiny_dirs, tmp_path):
    """Tiny models answer nothing right, so a speed bonus is the only reward: on-policy
    refinement must then raise the share of mismatches where the draft token is kept."""
    from cospec.arbiter import FEATURES, LearnedPolicy, save_arbiter

    start = tmp_path / "start.safetensors"
    save_arbiter(LearnedPolicy(len(FEATURES), hidden_units=4), start,
                 (str(tiny_dirs[0]), str(tiny_dirs[1])))
    out = tmp_path / "refined"
    assert main(list(map(str, [
        "refine", *models(tiny_dirs), "--arbiter", start, "--limit", "8", "--problems", "4",
        "--group", "4", "--max-new-tokens", "16", "--speed-bonus", "0.2", "--lr", "0.05",
        "--iterations", "8", "--out", out]))) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["accuracy"] == 0 for r in log)
    first, last = log[0]["keep_rate"], (log[-1]["keep_rate"] + log[-2]["keep_rate"]) / 2
    assert last > first + 0.1


def test_generate_help_lists_the_methods_it_runs(monkeypatch, capsys):
    """--method's help names every method generate decodes, and no other."""
    from cospec.methods import METHODS

    monkeypatch.setenv("COLUMNS", "1000")  # one help line per flag
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    line = next(x for x in capsys.readouterr().out.splitlines()
                if x.strip().startswith("--method"))
    listed = set(line.split("one of ", 1)[1].split(", "))
    assert "cos-cd" in listed
    assert listed == set(METHODS) - {"hf-assisted"}
    for name in listed - {"target", "draft", "spd"}:  # the help's names are ones it accepts
        assert main(["generate", "--method", name, "--prompt", " "]) == 2
        assert "unknown method" not in capsys.readouterr().err


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    """Where fastapi is missing, `cospec serve` with its usual flags is a one-line error
    naming the extra, not an argparse complaint about the flags."""
    import cospec

    for name in ("server", "server_schemas", "scheduler"):  # as if never imported
        monkeypatch.delitem(sys.modules, f"cospec.{name}", raising=False)
        monkeypatch.delattr(cospec, name, raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` fails
    assert main(["serve", "--target", "x", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fastapi" in err and "pip install 'cospec[serve]'" in err
