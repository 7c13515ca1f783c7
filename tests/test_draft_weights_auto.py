"""``--draft-weights auto``, the default of generate and serve: the draft's steps read int8
copies only where no method's output changes (the target's: spd and prompt lookup's kinds)
and a fast kernel reads them (a CPU with torch's int8 kernel, a GPU's fused layers)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model

from cospec import args as cli_args
from cospec import cpu_int8, fast, fused
from cospec.args import auto_draft_weights
from cospec.cli import build_parser, main
from cospec.models import Pair


@pytest.fixture(scope="module")
def pair():
    return Pair(tiny_model(1).float(), tiny_model(2, layers=1).float(), None, "t", "d")


@pytest.mark.parametrize("methods, kind", [
    (["spd"], "int8"), (["target", "spd", "spd-staged", "spd-lookup"], "int8"),
    (["target", "spd", "cospec"], "model"), (["draft"], "model"), (["cos-we"], "model"),
    (["we-sd"], "model"), ([], "model"), (["target"], "model")])
def test_int8_only_where_every_output_stays_the_targets(pair, methods, kind):
    assert auto_draft_weights(pair, methods) == kind


def test_the_draft_stays_whole_without_the_kernel_or_a_draft(pair, monkeypatch):
    no_draft = Pair(pair.target, None, None, "t", None)
    assert auto_draft_weights(no_draft, ["target"]) == "model"
    more = Pair(pair.target, pair.draft, None, "t", "d", extra=(pair.draft,))
    assert auto_draft_weights(more, ["spd"]) == "model"
    monkeypatch.setattr(cpu_int8, "available", lambda: False)
    assert auto_draft_weights(pair, ["spd"]) == "model"


def test_no_copies_for_a_draft_no_linear_of_which_fits_the_kernel():
    odd = tiny_model(3, layers=1, width=20).float()  # widths 20 and 40: not multiples of 16
    assert not cpu_int8.can_copy(odd)
    assert auto_draft_weights(Pair(odd, odd, None, "t", "d"), ["spd"]) == "model"


def test_fused_runs_as_the_engines_decide(monkeypatch):
    """``fast.fused_runs`` (the GPU's test): COSPEC_FUSED, the fast path, dtype and Qwen3's
    per-head norms, read from the model before any engine (triton's interpreter stands in
    for the GPU)."""
    model = tiny_model(4, layers=1).float()
    monkeypatch.setattr(fused, "_has_triton", lambda: True)
    monkeypatch.setattr(fused, "interpret", lambda: True)
    monkeypatch.setenv("COSPEC_STATIC", "1")
    monkeypatch.setenv("COSPEC_FUSED", "1")
    assert fast.fused_runs(model)
    assert not fast.fused_runs(tiny_model(4, layers=1))  # float64
    for mode in ("0", "auto"):  # auto: a CPU is not where they measured faster
        monkeypatch.setenv("COSPEC_FUSED", mode)
        assert not fast.fused_runs(model)
    monkeypatch.setenv("COSPEC_FUSED", "1")
    monkeypatch.setattr(model.model.layers[0].self_attn, "q_norm", torch.nn.Identity(),
                        raising=False)
    assert not fast.fused_runs(model)
    monkeypatch.delenv("COSPEC_STATIC")  # a CPU model off the fast path
    assert not fast.fused_runs(tiny_model(4, layers=1).float())


def test_generate_resolves_auto_for_its_method(tiny_dirs, capsys, monkeypatch):
    """generate's default: spd's draft reads int8 copies (its tokens still the target's),
    the draft method's own weights; eval and bench keep model as theirs."""
    kinds = []
    real = cli_args.draft_weights
    monkeypatch.setattr(cli_args, "draft_weights",
                        lambda pair, kind: (kinds.append(kind), real(pair, kind))[1])
    t, d = tiny_dirs
    outs = {}
    for method in ("target", "spd", "draft"):
        assert main(["generate", "--target", str(t), "--draft", str(d), "--method", method,
                     "--device", "cpu", "--prompt", "w5 w9 w12", "--no-chat",
                     "--max-new-tokens", "20", "--k", "4", "--json"]) == 0
        outs[method] = json.loads(capsys.readouterr().out)
    assert kinds == ["model", "int8", "model"]
    assert [outs[m]["draft_weights"] for m in outs] == kinds  # said with the output
    assert outs["spd"]["token_ids"] == outs["target"]["token_ids"]
    assert outs["spd"]["stats"]["drafted"] > 0
    parser = build_parser()
    for command in (["eval", "--task", "gsm8k", "--out", "x"],
                    ["bench", "--task", "gsm8k", "--out", "x"]):
        assert parser.parse_args(command).draft_weights == "model"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--task", "gsm8k", "--out", "x", "--draft-weights", "auto"])


def test_serve_resolves_auto_for_the_methods_it_offers(tiny_dirs, monkeypatch):
    """serve's default: int8 where every method offered (named or by default) has the
    target's output and some request would read the copies on a batch-1 path; on a CPU
    beside batch engines that is prompt lookup's methods only (never refused, as int8
    asked for is beside them with a method whose output is the draft's)."""
    from cospec import server

    class Loaded(Exception):
        pass

    kinds, offered = [], []

    def create_app(pair, methods, **_):  # what it would serve, with the draft resolved
        offered.append(methods)
        raise Loaded

    monkeypatch.setattr(cli_args, "draft_weights", lambda pair, kind: kinds.append(kind))
    monkeypatch.setattr(server, "create_app", create_app)
    t, d = tiny_dirs
    cases = {("--max-batch", "0", "--methods", "target,spd"): "int8",
             ("--max-batch", "0", "--methods", "target,spd,draft"): "model",
             ("--max-batch", "0"): "int8",  # the defaults: target, spd (the shipped
             ("--methods", "target,spd"): "model",  # arbiter does not fit these models)
             ("--methods", "target,spd,spd-staged"): "int8"}
    for flags in cases:
        with pytest.raises(Loaded):
            main(["serve", "--target", str(t), "--draft", str(d), "--device", "cpu",
                  "--port", "0", *flags])
    assert kinds == list(cases.values())
    assert offered[2] == offered[3] == ["target", "spd"]


def test_int8_readers_on_a_gpu_include_a_lone_spd_request():
    from types import SimpleNamespace

    from cospec.server import int8_readers

    def on(device):
        draft = SimpleNamespace(parameters=lambda: iter([torch.zeros(1, device="meta")]))
        if device == "cuda":
            draft.parameters = lambda: iter([SimpleNamespace(device=torch.device("cuda"))])
        return Pair(None, draft, None, "t", "d")

    names = ["target", "spd", "spd-staged"]
    assert int8_readers(names, on("cuda"), 16, solo=True) == ["spd", "spd-staged"]
    assert int8_readers(names, on("cuda"), 16, solo=False) == ["spd-staged"]
    assert int8_readers(names, on("cpu"), 16, solo=True) == ["spd-staged"]
    assert int8_readers(names, on("cpu"), 0, solo=True) == names
