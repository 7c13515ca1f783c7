"""Bad input to ``cospec train``, ``refine``, ``collect`` and ``verify-cost`` that used to
surface late or as a traceback: an ``--out`` that cannot be written, a step size or speed
bonus that overflows float32, a ``--target``/``--draft`` the data contradicts, a damaged
``optim.pt``, an unknown task. Each is one error line, given before the training or the
model loading it would waste, and leaves no folder behind."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from cospec import arbiter, bench, eval_setup, train
from cospec.arbiter import FEATURES, LearnedPolicy, arbiter_info, save_arbiter
from cospec.cli import build_parser, main
from cospec.errors import CospecError
from cospec.refine import policy_step, refine_settings
from cospec.tasks import TASK_NAMES

PAIR = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
NO_MODEL = ["--target", "/nonexistent/target", "--draft", "/nonexistent/draft"]
PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not PROC.is_dir(), reason="needs a /proc folder")


class ModelsLoaded(Exception):
    """Raised by the stand-ins for model loading: the command got past its checks."""


@pytest.fixture
def no_models(monkeypatch):
    """Model loading (refine's ``EvalSetup``, verify-cost's ``load_pair_of``) raises
    ModelsLoaded: a check that must come first cannot be passed by loading them."""
    def load(*args, **kwargs):
        raise ModelsLoaded
    monkeypatch.setattr(eval_setup, "EvalSetup", load)
    monkeypatch.setattr(bench, "load_pair_of", load)


@pytest.fixture
def no_training(monkeypatch):
    """``train.reinforce`` raises AssertionError: the refusal must come before training."""
    def reinforce(*args, **kwargs):
        raise AssertionError("trained before refusing")
    monkeypatch.setattr(train, "reinforce", reinforce)


def data_dir(path: Path, pair: tuple[str, str] | None = PAIR) -> Path:
    """A folder as cospec collect leaves it: meta.json naming ``pair`` (none: no meta.json)
    and one shard, 12 problems of 3 divergence points."""
    rng = random.Random(0)
    recs: list[dict] = []
    for i in range(12):
        tc = rng.random() < 0.5
        recs.append({"id": f"gsm8k/{i}", "target_correct": tc, "tokens": 5})
        recs += [{"id": f"gsm8k/{i}", "position": j, "target_correct": tc,
                  "draft_correct": rng.random() < 0.5, "control_correct": False,
                  "features": [round(rng.gauss(0, 1), 5) for _ in FEATURES]}
                 for j in range(3)]
    path.mkdir(parents=True)
    if pair:
        (path / "meta.json").write_text(json.dumps({"task": "gsm8k", "split": "dev",
                                                    "target": pair[0], "draft": pair[1]}))
    with gzip.open(path / "shard-0000.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"shard_seconds": 1.0}) + "\n")
        fh.writelines(json.dumps(r) + "\n" for r in recs)
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    """``cospec ARGV``: its exit status (an argparse refusal's too) and its last stderr line;
    never a traceback."""
    try:
        rc = main(list(map(str, argv)))
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, (err.strip().splitlines() or [""])[-1]


def refused(capsys, *argv) -> str:
    """The one error line of a command that must fail with status 2."""
    rc, line = cli(capsys, *argv)
    assert rc == 2, line
    return line


# ---------------------------------------------------------------- 1: train --out


@pytest.mark.parametrize("out, message", [
    ("{file}/x.safetensors", "{file} is not a folder"),
    ("{file}/sub/x.safetensors", "{file} is not a folder"),
    pytest.param("/proc/x.safetensors", "cannot write files in /proc", marks=needs_proc),
], ids=["in-a-file", "under-a-file", "proc"])
def test_train_refuses_an_out_it_cannot_write_before_training(tmp_path, capsys, no_training,
                                                              out, message):
    data = data_dir(tmp_path / "data")
    file = data / "meta.json"
    out = out.format(file=file)
    line = refused(capsys, "train", "--data", data, "--out", out)
    assert line.startswith(f"error: --out {out}: {message.format(file=file)}"), line


def test_train_makes_the_folders_of_out_and_only_once_it_writes(tmp_path, capsys):
    data = data_dir(tmp_path / "data")
    out = tmp_path / "new" / "deeper" / "arb.safetensors"
    line = refused(capsys, "train", "--data", data, "--out", out, "--epochs", "1",
                   "--val-fraction", "0.001")  # too few problems: refused after the check
    assert "too few problems" in line, line
    assert not (tmp_path / "new").exists()
    rc, line = cli(capsys, "train", "--data", data, "--out", out, "--epochs", "1")
    assert rc == 0, line
    assert arbiter_info(out)["target"] == PAIR[0]


def test_an_arbiter_that_cannot_be_saved_is_one_error_line(tmp_path, capsys, monkeypatch):
    """SafetensorError is no OSError: the CLI printed a traceback for it."""
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")
    monkeypatch.setattr(arbiter, "save_file", full_disk)
    data = data_dir(tmp_path / "data")
    out = tmp_path / "arb.safetensors"
    line = refused(capsys, "train", "--data", data, "--out", out, "--epochs", "1")
    assert line == (f"error: cannot write the arbiter file {out}: Error while serializing: "
                    "I/O error: No space left on device"), line


@needs_proc
def test_save_arbiter_names_a_file_it_cannot_write():
    with pytest.raises(CospecError, match="cannot write the arbiter file /proc/x.safetensors"):
        save_arbiter(LearnedPolicy(len(FEATURES), hidden_units=4), "/proc/x.safetensors", PAIR)


# ---------------------------------------------------------------- 2: float32 overflow


@pytest.mark.parametrize("cmd, flag, value", [
    ("train", "--speed-bonus", "1e39"), ("train", "--speed-bonus", "-1e39"),
    ("train", "--lr", "1e39"), ("refine", "--speed-bonus", "1e39"),
    ("refine", "--lr", "1e39"),
])
def test_numbers_past_float32_are_refused_by_the_parser(tmp_path, capsys, cmd, flag, value):
    argv = (["train", "--data", tmp_path / "no-data"] if cmd == "train"
            else ["refine", *NO_MODEL, "--arbiter", tmp_path / "no.safetensors"])
    line = refused(capsys, *argv, "--out", tmp_path / "o", f"{flag}={value}")
    assert f"argument {flag}: must be at most 3.403e+38 in size (float32" in line, line
    assert f"got {value}" in line, line


@pytest.mark.parametrize("flags, what, lower", [
    (["--lr", "1e38"], "Adam's step size overflows float32", "--lr"),
    (["--lr", "1e30"], "the weights or Adam's moments are no longer finite", "--lr"),
    (["--speed-bonus", "1e30"], "the weights or Adam's moments are no longer finite",
     "--speed-bonus"),
    (["--speed-bonus", "3e38"], "no longer finite", "--speed-bonus"),
], ids=["lr-step-overflow", "lr-nan-weights", "bonus-moments-overflow", "bonus-nan"])
def test_a_diverging_training_names_the_flag_to_lower(tmp_path, capsys, flags, what, lower):
    data = data_dir(tmp_path / "data")
    out = tmp_path / "arb.safetensors"
    line = refused(capsys, "train", "--data", data, "--out", out, "--epochs", "5", *flags)
    assert line.startswith("error: training diverged in epoch "), line
    assert what in line and line.endswith(f"; lower {lower}"), line
    assert not out.exists()


def test_large_but_finite_steps_and_bonuses_still_train(tmp_path, capsys):
    data = data_dir(tmp_path / "data")
    for n, flags in enumerate((["--lr", "100", "--speed-bonus=-1000"],
                               ["--lr", "0.5", "--speed-bonus", "1e6"])):
        out = tmp_path / f"arb{n}.safetensors"
        rc, line = cli(capsys, "train", "--data", data, "--out", out, "--epochs", "5", *flags)
        assert rc == 0, line
        assert out.exists()


def test_a_diverging_refine_step_is_an_error_not_nan_weights():
    torch.manual_seed(0)
    pol = LearnedPolicy(len(FEATURES), hidden_units=4)
    opt = torch.optim.Adam(pol.parameters(), lr=0.01)
    before = [w.detach().clone() for w in pol.parameters()]
    feats = [0.5] * len(FEATURES)
    with pytest.raises(CospecError, match="refinement diverged: a non-finite loss"):
        policy_step(pol, opt, [(feats, True, 3e38)] * 8)
    assert all(torch.equal(a, b) for a, b in zip(before, pol.parameters()))  # no step taken


# ---------------------------------------------------------------- 3: train --target/--draft


@pytest.mark.parametrize("flags, message", [
    (["--target", "qwen2.5-coder-7b"], f"--target qwen2.5-coder-7b contradicts --data, "
                                       f"collected with target {PAIR[0]}"),
    (["--target", PAIR[0], "--draft", "other/draft"],
     f"--draft other/draft contradicts --data, collected with draft {PAIR[1]}"),
], ids=["target", "draft"])
def test_a_pair_flag_that_contradicts_the_data_is_refused(tmp_path, capsys, no_training,
                                                          flags, message):
    data = data_dir(tmp_path / "data")
    out = tmp_path / "arb.safetensors"
    line = refused(capsys, "train", "--data", data, "--out", out, *flags)
    assert line.startswith(f"error: {message}; drop --"), line
    assert not out.exists()


def test_pair_flags_that_agree_with_the_data_or_replace_it_are_fine(tmp_path, capsys):
    """Compared by file name, as load_arbiter compares pairs; without a meta.json the
    flags name the pair."""
    for name, pair, flags in (("same", PAIR, ["--target", f"/models/{PAIR[0]}"]),
                              ("none", None, ["--target", "t", "--draft", "d"])):
        data = data_dir(tmp_path / name, pair)
        out = tmp_path / f"{name}.safetensors"
        rc, line = cli(capsys, "train", "--data", data, "--out", out, "--epochs", "1", *flags)
        assert rc == 0, line
        meta = arbiter_info(out)
        assert (meta["target"], meta["draft"]) == ((f"/models/{PAIR[0]}", PAIR[1]) if pair
                                                   else ("t", "d"))


# ---------------------------------------------------------------- 4: refine resume and --out


def refine_argv(out: Path, *more) -> list:
    return ["refine", *NO_MODEL, "--task", "gsm8k", "--split", "dev", "--limit", "2",
            "--problems", "2", "--group", "2", "--max-new-tokens", "4", "--dtype", "float32",
            "--iterations", "2", "--out", out, *more]


def resumable(out: Path, optim: bytes | None) -> Path:
    """A refinement folder as one finished iteration of ``refine_argv(out)`` leaves it, its
    optim.pt holding ``optim`` (None: a real Adam state of its arbiter)."""
    args = build_parser().parse_args(list(map(str, refine_argv(out))))
    out.mkdir()
    torch.manual_seed(0)
    pol = LearnedPolicy(len(FEATURES), hidden_units=4)
    info = {"threshold": 0.5, "refine_settings": refine_settings(args),
            "refine_history": [{"iteration": 0}],
            "refine_start": {"path": "start.safetensors", "sha256": "0" * 16}}
    save_arbiter(pol, out / "arbiter.safetensors", PAIR, info)
    if optim is None:
        opt = torch.optim.Adam(pol.parameters(), lr=0.02)
        policy_step(pol, opt, [([0.5] * len(FEATURES), True, 1.0)])
        torch.save(opt.state_dict(), out / "optim.pt")
    else:
        (out / "optim.pt").write_bytes(optim)
    return out


def saved(obj) -> bytes:
    """``obj`` as torch.save writes it."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def other_shapes() -> bytes:
    """A real Adam state, of an arbiter with other hidden units."""
    pol = LearnedPolicy(len(FEATURES), hidden_units=8)
    opt = torch.optim.Adam(pol.parameters(), lr=0.02)
    policy_step(pol, opt, [([0.5] * len(FEATURES), True, 1.0)])
    return saved(opt.state_dict())


@pytest.mark.parametrize("optim", [
    b"not a pickle", b"", saved({"state": {}, "param_groups": []})[:-40], saved({}),
    saved(torch.zeros(3)), other_shapes(),
], ids=["garbage", "empty", "cut", "no-groups", "a-tensor", "other-shapes"])
def test_a_damaged_optimizer_state_is_named_before_the_models_load(tmp_path, capsys,
                                                                   no_models, optim):
    out = resumable(tmp_path / "r", optim)
    line = refused(capsys, *refine_argv(out))
    assert line.startswith(f"error: {out / 'optim.pt'} is not a readable optimizer state ("), line
    assert line.endswith(f"delete it to resume the refinement in {out} with Adam restarted, "
                         "or use another --out to start over"), line


def test_a_sound_or_missing_optimizer_state_resumes(tmp_path, no_models):
    out = resumable(tmp_path / "r", None)
    with pytest.raises(ModelsLoaded):  # past the resume checks, on to the models
        main(list(map(str, refine_argv(out))))
    (out / "optim.pt").unlink()  # what the message says to do: Adam restarts
    with pytest.raises(ModelsLoaded):
        main(list(map(str, refine_argv(out))))


@pytest.mark.parametrize("start, message", [
    (None, "refine starts from an arbiter: give --arbiter PATH"),
    ("missing.safetensors", "arbiter file not found: {tmp}/missing.safetensors"),
    ("bad.safetensors", "{tmp}/bad.safetensors is not a readable arbiter file"),
], ids=["none", "missing", "not-an-arbiter"])
def test_refine_makes_no_out_folder_when_it_refuses(tmp_path, capsys, no_models, start,
                                                    message):
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "a" / "r"
    flags = [] if start is None else ["--arbiter", tmp_path / start]
    line = refused(capsys, *refine_argv(out, *flags))
    assert line.startswith(f"error: {message.format(tmp=tmp_path)}"), line
    assert not (tmp_path / "a").exists()


def test_refine_refuses_an_out_that_is_a_file_before_the_models_load(tmp_path, capsys,
                                                                     no_models):
    start = tmp_path / "start.safetensors"
    save_arbiter(LearnedPolicy(len(FEATURES), hidden_units=4), start, PAIR)
    for out in (start, start / "r"):
        line = refused(capsys, *refine_argv(out, "--arbiter", start))
        assert line == f"error: --out {out}: {start} is not a folder", line


# ---------------------------------------------------------------- 5: unknown task or split


@pytest.mark.parametrize("cmd", ["collect", "refine"])
@pytest.mark.parametrize("task, split, message", [
    ("bogus", "dev", f"unknown task 'bogus'; choose from {', '.join(TASK_NAMES)}"),
    ("gsm8k", "bogus", "gsm8k has no split 'bogus'; choose from heldout, dev, all"),
], ids=["task", "split"])
def test_an_unknown_task_or_split_is_named_as_such(tmp_path, capsys, no_models, cmd, task,
                                                   split, message):
    out = tmp_path / "d"
    line = refused(capsys, cmd, *NO_MODEL, "--arbiter", tmp_path / "a.safetensors",
                   "--task", task, "--split", split, "--out", out)
    assert line == f"error: {message}", line
    assert not out.exists()


def test_an_evaluation_split_is_still_refused_as_one(tmp_path, capsys, no_models):
    line = refused(capsys, "collect", *NO_MODEL, "--task", "gsm8k", "--split", "heldout",
                   "--out", tmp_path / "d")
    assert line.endswith("gsm8k/heldout is kept for evaluation"), line


# ---------------------------------------------------------------- 6: verify-cost --out


@pytest.mark.parametrize("out, message", [
    ("{file}", "{file} is not a folder"),
    ("{file}/sub", "{file} is not a folder"),
    pytest.param("/proc/sub", "cannot write files in /proc", marks=needs_proc),
], ids=["a-file", "under-a-file", "proc"])
def test_verify_cost_checks_its_out_before_timing(tmp_path, capsys, no_models, out, message):
    file = tmp_path / "f"
    file.write_text("x")
    out = out.format(file=file)
    line = refused(capsys, "verify-cost", *NO_MODEL, "--ks", "1", "--out", out)
    assert line.startswith(f"error: --out {out}: {message.format(file=file)}"), line


# ---------------------------------------------------------------- 7: train's --data and --out


def test_train_names_a_missing_data_path_first(tmp_path, capsys):
    """Not "cannot tell which model pair": the path that is not there."""
    line = refused(capsys, "train", "--data", tmp_path / "nope", "--out",
                   tmp_path / "arb.safetensors")
    assert line == f"error: no divergence data at {tmp_path / 'nope'}", line


def test_train_refuses_a_file_that_is_no_shard(tmp_path, capsys):
    """Not "delete it and run collect again": it never was collect's."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    line = refused(capsys, "train", "--data", notes, "--out", tmp_path / "arb.safetensors",
                   "--target", "a", "--draft", "b")
    assert "is no shard of cospec collect" in line and "delete it" not in line, line


def test_train_writes_its_arbiter_only_to_a_safetensors_name(tmp_path, capsys):
    """An --out of another kind (here an existing text file) is refused, not overwritten."""
    data = data_dir(tmp_path / "data")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    line = refused(capsys, "train", "--data", data, "--out", notes, "--epochs", "1")
    assert "an arbiter is a safetensors file; name it notes.safetensors" in line, line
    assert notes.read_text() == "keep me"
