"""Numbers at the edges: a vanishing temperature decodes greedily instead of dividing into
nan, CoS refuses non-finite weights and an overflowing mu, and a method or sampling the run
cannot take (or an output folder it cannot write) is refused before any model loads."""

import json
import math

import pytest
import torch

from cospec import generate_cmd, server
from cospec.cli import main
from cospec.cos import Combination
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig, probabilities


@pytest.mark.parametrize("temperature", [1e-40, 1e-20, 9.9e-6])
def test_a_vanishing_temperature_is_greedy(temperature):
    logits = torch.tensor([[30.0, 29.5, -4.0, 12.0], [-1.0, 2.0, 2.5, 0.0]])
    cfg = SamplingConfig(temperature)
    probs = probabilities(logits, cfg)
    assert cfg.greedy
    assert torch.isfinite(probs).all()
    assert torch.equal(probs, probabilities(logits, GREEDY))
    assert not SamplingConfig(1e-4).greedy  # a small temperature above it still samples


def test_generate_at_a_vanishing_temperature_gives_the_greedy_tokens(tiny_dirs, capsys):
    t, d = tiny_dirs
    out = {}
    for temperature in ("0", "1e-40"):
        assert main(["generate", "--target", str(t), "--draft", str(d), "--method", "spd",
                     "--prompt", "w5 w9 w12", "--no-chat", "--max-new-tokens", "12",
                     "--temperature", temperature, "--json"]) == 0
        out[temperature] = json.loads(capsys.readouterr().out)["token_ids"]
    assert out["0"] == out["1e-40"] and len(out["0"]) == 12


@pytest.mark.parametrize("weights", [(math.nan, math.nan), (math.nan, 1.0), (math.inf, 0.0),
                                     (0.3, 0.3), (-0.5, 1.5)])
def test_ensemble_weights_must_be_finite_and_sum_to_one(weights):
    with pytest.raises(CospecError, match="ensemble weights"):
        Combination("we", weights)


@pytest.mark.parametrize("mu", [math.nan, -0.1, 1e300, math.inf])
def test_contrastive_mu_out_of_range_is_refused(mu):
    with pytest.raises(CospecError, match="contrastive mu"):
        Combination("cd", mu=mu)
    Combination("cd", mu=100.0)  # the bound itself is taken


def _no_loading(*args, **kwargs):
    raise AssertionError("models loaded before the input was checked")


def test_sampling_a_greedy_only_method_is_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(generate_cmd, "load_pair_of", _no_loading)
    assert main(["generate", "--method", "cospec", "--temperature", "0.5", "--prompt",
                 "hi"]) == 2
    assert "greedy-only" in capsys.readouterr().err


def test_serve_refuses_an_unknown_method_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(server, "load_pair_of", _no_loading)
    monkeypatch.setattr(server, "bind", _no_loading)
    assert main(["serve", "--methods", "spd,bogus"]) == 2
    assert "cannot serve method(s) bogus" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["eval", "collect"])
def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys, cmd):
    from cospec import eval_setup

    monkeypatch.setattr(eval_setup, "load_pair_of", _no_loading)
    (tmp_path / "taken").write_text("")
    split = ["--split", "dev"]
    assert main([cmd, "--task", "gsm8k", *split, "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'taken'}: {tmp_path / 'taken'} is not a folder" in err
