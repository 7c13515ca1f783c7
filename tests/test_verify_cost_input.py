"""``cospec verify-cost``: bad flags refused before any model loads, one k, rows and JSON
keys named by the models timed, and the relative columns headed by what they divide by."""

import json

import pytest

from cospec import bench
from cospec.cli import main
from cospec.errors import CospecError


def layers_cost(model, k, prefix, reps, mode):
    """A stand-in for ``forward_cost``: seconds that tell the models (their layer count)
    and k apart."""
    return model.config.num_hidden_layers * (1 + 0.1 * k)


def run(tmp_path, *flags):
    assert main(["verify-cost", *map(str, flags), "--reps", "1", "--prefix", "4",
                 "--out", str(tmp_path)]) == 0
    return (json.loads((tmp_path / "verify_cost.json").read_text()),
            (tmp_path / "verify_cost.md").read_text())


@pytest.mark.parametrize("flags, message", [
    (["--ks", "1,x"], "argument --ks: not an integer: 'x'"),
    (["--ks", ""], "argument --ks: give draft lengths"),
    (["--ks", "1,,2"], "argument --ks: an empty draft length"),
    (["--ks", "0,2"], "argument --ks: must be > 0, got 0"),
    (["--ks=-2"], "argument --ks: must be > 0, got -2"),
    (["--ks", "2,4,2"], "argument --ks: draft length 2 given twice"),
    (["--reps", "0"], "argument --reps: must be > 0, got 0"),
    (["--prefix", "-5"], "argument --prefix: must be >= 0, got -5"),
])
def test_bad_flags_are_refused_before_loading(tmp_path, capsys, flags, message):
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    with pytest.raises(SystemExit) as exit_:
        main(["verify-cost", "--target", str(missing), "--draft", str(missing), *flags,
              "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_draft_lengths_keep_the_order_given():
    assert bench.draft_lengths(" 4, 2") == [4, 2]
    assert bench.draft_lengths("1") == [1]


@pytest.mark.parametrize("prefix", ["0", "4"])
def test_one_k_is_timed_and_explained(tiny_dirs, tmp_path, capsys, prefix):
    """--ks 1 (and --prefix 0) time the real forwards and say why no k is predicted."""
    t, d = tiny_dirs
    assert main(["verify-cost", "--target", str(t), "--draft", str(d), "--ks", "1",
                 "--reps", "1", "--prefix", prefix, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "verify_cost.json").read_text())
    assert res["best_k"] is None
    assert all(list(per_k) == ["1"] for per_k in res["models"].values())
    assert "No best draft length predicted" in (tmp_path / "verify_cost.md").read_text()
    assert "No best draft length predicted" in capsys.readouterr().out


def test_best_k_needs_a_verify_over_two_tokens():
    from cospec.k_auto import best_k

    with pytest.raises(CospecError, match="over k \\+ 1 tokens for some k >= 1"):
        best_k({1: 1.0}, 0.1, 0.8)
    with pytest.raises(CospecError, match="timed: 2, 3"):
        best_k({2: 1.0, 3: 1.0}, 0.1, 0.8)
    assert best_k({1: 1.0, 2: 1.0}, 0.1, 0.8)[0] == 1  # the one length there is


def test_models_flag_labels_what_was_timed(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "forward_cost", layers_cost)
    t, d = tiny_dirs  # the target has 2 layers, the draft 1
    res, md = run(tmp_path, "--models", f"{d},{t}", "--ks", "2")
    assert res["roles"] == {"target": str(t), "draft": str(d)}
    assert res["models"][str(t)]["2"]["auto"] == pytest.approx(2 * 1.2)
    assert res["models"][str(d)]["2"]["auto"] == pytest.approx(1 * 1.2)
    assert "qwen" not in md and "qwen" not in json.dumps(res)  # not the default names
    assert f"| {d} | draft | 2 |" in md and f"| {t} | target | 2 |" in md
    assert f"--models {d},{t}" in res["command"] and "--target" not in res["command"]


def test_one_model_as_target_and_draft_keeps_both(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "forward_cost", layers_cost)
    t = tiny_dirs[0]
    res, md = run(tmp_path, "--target", t, "--draft", t, "--ks", "2")
    assert list(res["models"]) == [f"{t} (target)", f"{t} (draft)"]
    assert res["roles"] == {"target": f"{t} (target)", "draft": f"{t} (draft)"}
    assert f"| {t} (target) | target | 1 |" in md and f"| {t} (draft) | draft | 1 |" in md


def test_relative_columns_divide_by_k_1_as_headed(tiny_dirs, tmp_path, monkeypatch):
    """--ks 2,4 (no 1): k = 1 is timed too, and the ÷ k=1 columns divide by it."""
    monkeypatch.setattr(bench, "forward_cost", layers_cost)
    t, d = tiny_dirs
    res, md = run(tmp_path, "--target", t, "--draft", d, "--ks", "4,2")
    for per_k in res["models"].values():
        assert list(per_k) == ["1", "2", "4"]
        for k, costs in per_k.items():
            for mode in ("auto", "plain", "weight-first"):
                assert costs[f"{mode}_rel"] == pytest.approx((1 + 0.1 * int(k)) / 1.1)
    assert res["relative_to_k"] == 1 and "auto ÷ k=1" in md
    assert res["best_k"]["0.9"]["k"] in (1, 3)  # verifies over 2 and 4 tokens were timed


@pytest.mark.parametrize("flags", [["--ks", "1,100000", "--prefix", "4"],
                                   ["--ks", "4", "--prefix", "100000"]])
def test_positions_past_the_models_context_are_refused(tiny_dirs, tmp_path, capsys, flags):
    """A prefix and k past the models' positions would time forwards no decoding makes (or
    allocate without end): refused after loading, before any timing, nothing written."""
    t, d = tiny_dirs
    out = tmp_path / "out"
    assert main(["verify-cost", "--target", str(t), "--draft", str(d), *flags, "--reps", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass the models' context of" in err and "Traceback" not in err
    assert not out.exists()
