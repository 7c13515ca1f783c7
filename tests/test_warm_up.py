"""Capturing a batch engine's CUDA graphs before it serves (``cospec.fast_batch_warm``).

On the CPU there are no CUDA graphs, so ``graphs`` stands them in: every ``BatchLM`` runs
its graph path (one capture per (b, n, span), outputs in static buffers that each replay
rewrites), each capture recomputing eagerly. After ``warm_up`` a mix of requests that join
at different steps, grow through every cache span and fill every rows bucket must capture
nothing new, and decode exactly the tokens of the batch-1 loop (and of an engine never
warmed up). ``cospec serve --warm-up`` warms the default method's engine, which then serves.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fake_graphs import fake_compiled, fake_graphs
from tiny import near_copy, tiny_model

from cospec import batch_lm, fast_batch
from cospec.acceptance import ExactRule
from cospec.arbiter import ArbiterRule, ConfidencePolicy
from cospec.batch_lm import BatchLM
from cospec.cos import Combination
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.fast_batch import BatchEngine
from cospec.fast_batch_warm import PREFILL_WARM, captures, warm_up

MAX_LEN = 64


@pytest.fixture
def graphs(monkeypatch) -> list[tuple[int, int, int, int]]:
    """The captures (``fake_graphs``), with spans 8, 16, 32, 64 within MAX_LEN."""
    monkeypatch.setattr(fast_batch, "MIN_SPAN", 8)
    return fake_graphs(monkeypatch)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model(1, dtype=torch.float32)
    return target, near_copy(target)  # a draft the target agrees with about half the time


WE = Combination("we", (0.5, 0.5))
METHODS = {  # name: (BatchEngine keyword arguments, the batch-1 rule or None: CoS)
    "target": (dict(k=3), ExactRule()),
    "spd": (dict(k=3), ExactRule()),
    "spd-k1": (dict(k=1), ExactRule()),
    "cospec": (dict(k=2, policy=ConfidencePolicy(0.2)), ArbiterRule(ConfidencePolicy(0.2))),
    "cos-we-k1": (dict(k=1, combo=WE, alternate=True), None),  # its 1-token pass: pending only
    "we-sd": (dict(k=2, combo=WE, alternate=False), None),
}


def engine(pair, method: str) -> BatchEngine:
    target, near = pair
    kw, _ = METHODS[method]
    return BatchEngine(target, None if method == "target" else near, rows=5, max_len=MAX_LEN,
                       **kw)


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 96, (n,), generator=g).tolist()


def serve_mix(eng: BatchEngine) -> list[tuple[list[int], int, list[int]]]:
    """Requests joining at different steps through 5 slots: one alone (rows bucket 1), one
    more with a short one (4), two more short ones (5), the two long ones left (2), two more
    (4). The first grows from 3 tokens to the last cache span. Returns (prompt, budget,
    tokens) per request."""
    margin = eng._reach(0)
    budgets = [MAX_LEN - margin - 3, MAX_LEN - margin - 5 - 8, 9, 2, 2, 3, 2]
    prompts = [prompt(i, n) for i, n in enumerate((3, 5, 2, 7, 4, 6, 1))]
    out: dict[int, list[int]] = {}
    rid: list[int] = []

    def submit(*which: int) -> None:
        for i in which:
            rid.append(eng.submit(prompts[i], budgets[i]))
            out[rid[-1]] = []

    def step(times: int | None = None, until=lambda: False) -> None:
        while eng.busy and (times is None or times > 0) and not until():
            for c in eng.step():
                out[c.rid] += c.tokens
            times = None if times is None else times - 1

    submit(0)
    step(2)
    submit(1, 2)
    step(1)
    submit(3, 4)
    step(until=lambda: all(eng.slots[s] is None for s in (2, 3, 4)))
    step(2)
    submit(5, 6)
    step()
    assert len(rid) == len(prompts) and not eng.busy
    return [(p, m, out[r]) for p, m, r in zip(prompts, budgets, rid)]


def record(monkeypatch) -> set[tuple[int, int, int, int]]:
    """Every (id of the BatchLM, b, n, span) that ``BatchLM.run`` runs from now on."""
    seen, run = set(), BatchLM.run

    def logged(self, ids, pos, first=0):
        seen.add((id(self), *ids.shape, self.span))
        return run(self, ids, pos, first)

    monkeypatch.setattr(BatchLM, "run", logged)
    return seen


@pytest.mark.parametrize("method", list(METHODS))
def test_no_capture_after_warm_up(pair, graphs, method, monkeypatch):
    """Every (model, b, n, span) a served mix runs was captured by the warm-up: the mix
    captures nothing more. The mix reaches every rows bucket and every span (and CoS k=1
    its proposer's one-token pass, which only a pending proposal runs)."""
    eng = engine(pair, method)
    done = warm_up(eng, progress=False)
    warmed = set(graphs)
    assert done.captured == len(warmed) == len(graphs) > 0
    assert done.buckets == (1, 2, 4, 5) and done.spans == tuple(eng.spans())
    assert done.spans[-2:] == (32, 64) and len(done.spans) >= 3
    seen = record(monkeypatch)
    serve_mix(eng)
    assert seen <= warmed, sorted(seen - warmed)
    assert len(graphs) == len(warmed)  # no capture while serving
    assert {b for _, b, _, _ in seen} == set(done.buckets)
    assert {s for *_, s in seen} == set(done.spans)
    if method == "cos-we-k1":
        assert any(lm == id(eng.draft) and n == 1 for lm, _, n, _ in seen)


@pytest.mark.parametrize("method", list(METHODS))
def test_warm_up_keeps_the_tokens(pair, graphs, method):
    """After the warm-up the engine is idle, its counters untouched, and the mix decodes
    exactly the batch-1 loop's tokens (CoS: those of an engine never warmed up)."""
    eng = engine(pair, method)
    warm_up(eng, progress=False)
    assert not eng.busy and eng.stats.generated == 0 and eng.next_rid == 0
    got = serve_mix(eng)
    cold = serve_mix(engine(pair, method))
    assert [t for *_, t in got] == [t for *_, t in cold]
    rule = METHODS[method][1]
    if rule is not None:
        target, near = pair
        k = METHODS[method][0]["k"]
        want = [[t.id for t in generate(target, None if method == "target" else near, p, rule,
                                        k=k, max_new_tokens=m)] for p, m, _ in got]
        assert [t for *_, t in got] == want


def test_warm_up_without_graphs_does_nothing(pair, monkeypatch):
    """On the CPU (no graphs) nothing runs; a busy engine is refused."""
    eng = engine(pair, "spd")
    assert not captures(eng.device)
    seen = record(monkeypatch)
    done = warm_up(eng, progress=False)
    assert done.captured == 0 and not seen and "nothing to capture" in str(done)
    eng.submit(prompt(0, 4), 3)
    eng.step()
    with pytest.raises(CospecError, match="slots hold requests"):
        warm_up(eng, progress=False)


@pytest.mark.parametrize("flag", ["compiled", None, "eager", "graphs"])
def test_warm_up_compiles_the_prefill(pair, flag, monkeypatch):
    """With a compiled prefill (COSPEC_PREFILL=compiled, where layers are compiled) warm-up
    runs each model's prefill through its compiled halves (recording stand-ins here) for one
    row and for two, and the engine's tokens stay batch-1 greedy's; unset, eager or graphs
    (no graphs here): no prefill runs."""
    seen = fake_compiled(monkeypatch, batch_lm)
    if flag is None:
        monkeypatch.delenv("COSPEC_PREFILL", raising=False)
    else:
        monkeypatch.setenv("COSPEC_PREFILL", flag)
    eng = engine(pair, "spd")
    warm_up(eng, progress=False)
    if flag == "compiled":
        assert {(1, PREFILL_WARM), (2, PREFILL_WARM)} == {tuple(s[:2]) for s in seen}
    else:
        assert seen == []
    p = prompt(3, 6)
    eng.submit(p, 8)
    out = []
    while eng.busy:
        out += [t for c in eng.step() for t in c.tokens]
    assert out == [t.id for t in generate(pair[0], pair[1], p, ExactRule(), k=3,
                                          max_new_tokens=8)]


def test_serve_flag(monkeypatch):
    """``--warm-up`` parses (off by default) and reaches ``create_app``."""
    pytest.importorskip("fastapi")
    from cospec import server
    from cospec.cli import build_parser

    assert build_parser().parse_args(["serve"]).warm_up is False
    args = build_parser().parse_args(["serve", "--warm-up", "--k", "3"])
    assert args.warm_up is True
    seen = {}
    monkeypatch.setattr(server, "bind", lambda host, port: None)
    monkeypatch.setattr(server, "_show_logs", lambda: None)
    monkeypatch.setattr(server, "load_pair_of", lambda args, need_draft, methods: "pair")
    monkeypatch.setattr(server, "create_app", lambda pair, **kw: seen.update(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        server.cmd_serve(args)
    assert seen["warm_up"] is True and seen["k"] == 3


@pytest.mark.parametrize("method", ["target", "spd"])
def test_warm_up_captures_the_prefill_graphs(pair, graphs, method, monkeypatch):
    """COSPEC_PREFILL=graphs: the warm-up also captures each model's prefill graph of every
    padded shape; the served mix then captures none and still decodes the batch-1 loop's
    tokens."""
    monkeypatch.setenv("COSPEC_PREFILL", "graphs")
    eng = engine(pair, method)
    done = warm_up(eng, progress=False)
    shapes = eng.target.prefill_shapes()
    assert {n for _, n in shapes} == {16, 32, 64} and {b for b, _ in shapes} == {1, 2, 4, 5}
    assert [set(lm.prefill_graphs) for lm in eng.models] == [set(shapes)] * len(eng.models)
    assert done.prefill == len(shapes) * len(eng.models) and "prefill graphs" in str(done)
    warmed = [dict(lm.prefill_graphs) for lm in eng.models]
    got = serve_mix(eng)
    assert [lm.prefill_graphs for lm in eng.models] == warmed  # the same graph objects
    draft = None if method == "target" else pair[1]
    want = [[t.id for t in generate(pair[0], draft, p, ExactRule(), k=3, max_new_tokens=m)]
            for p, m, _ in got]
    assert [t for *_, t in got] == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_after_warm_up(pair, monkeypatch):
    """On a GPU (float32, real CUDA graphs): the mix captures nothing after the warm-up and
    decodes the batch-1 loop's tokens."""
    monkeypatch.setattr(fast_batch, "MIN_SPAN", 8)
    target, near = (copy.deepcopy(m).cuda() for m in pair)
    eng = BatchEngine(target, near, k=3, rows=5, max_len=MAX_LEN)
    done = warm_up(eng, progress=False)
    keys = [set(lm.graphs) for lm in eng.models]
    assert done.captured == sum(map(len, keys)) > 0
    got = serve_mix(eng)
    assert [set(lm.graphs) for lm in eng.models] == keys
    want = [[t.id for t in generate(target, near, p, ExactRule(), k=3, max_new_tokens=m)]
            for p, m, _ in got]
    assert [t for *_, t in got] == want
