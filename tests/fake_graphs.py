"""CUDA graphs stood in on the CPU for ``batch_lm.BatchLM``: its graph path runs (one
capture per (b, n, span), outputs in static buffers that each replay rewrites), each capture
and replay an eager forward. And compiled layer halves stood in likewise (``fake_compiled``)."""

from __future__ import annotations

import torch

from cospec import batch_lm
from cospec.batch_lm import BatchLM


class FakeGraph:
    """A CUDA graph's contract: outputs in static buffers, which ``replay`` recomputes from
    the model's static ids / positions buffers."""

    def __init__(self, lm: BatchLM, b: int, n: int):
        self.lm, self.b, self.n, self.span = lm, b, n, lm.span
        self.out = [t.clone() for t in self.forward()]

    def forward(self):
        lm, b, n = self.lm, self.b, self.n
        return lm._forward(lm.ids[:b, :n], lm.pos[:b, :n], 0, eager=True, span=self.span)

    def replay(self) -> None:
        for buf, t in zip(self.out, self.forward()):
            buf.copy_(t)


class FakePassGraph:
    """A captured pass without outputs (COSPEC_PREFILL=graphs' prefill): ``replay`` reruns
    it, on whatever the static buffers hold then."""

    def __init__(self, forward):
        self.forward = forward
        forward()  # as a real capture's warm-up runs: the pass happens once here

    def replay(self) -> None:
        self.forward()


def fake_graphs(monkeypatch) -> list[tuple[int, int, int, int]]:
    """Engines built from now on take their graph path on the CPU; returns the list of the
    captures made, as (id of the BatchLM, b, n, span), in order (prefill graphs, when
    COSPEC_PREFILL=graphs, are in each BatchLM's ``prefill_graphs``)."""
    made = []

    def capture(self, b, n):
        made.append((id(self), b, n, self.span))
        g = FakeGraph(self, b, n)
        return g, *g.out

    real = batch_lm.layer_functions
    monkeypatch.setattr(batch_lm, "layer_functions",
                        lambda device, graphs, compile: real(device, True, compile))
    monkeypatch.setattr(BatchLM, "_capture", capture)
    monkeypatch.setattr(BatchLM, "_capture_graph", lambda self, forward: (
        FakePassGraph(forward), None))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    return made


def fake_compiled(monkeypatch, module) -> list[torch.Size]:
    """Engines ``module`` (``fast`` or ``batch_lm``) builds from now on get "compiled" layer
    halves (no graphs): the reference ones, recording the shape of each input ``x`` they get.
    Returns that list; what runs eagerly never lands in it."""
    seen = []

    def recording(fn):
        def wrapped(x, *args, **kw):
            seen.append(x.shape)
            return fn(x, *args, **kw)
        return wrapped

    compiled = (False, True, recording(module._qkv), recording(module._rest))
    monkeypatch.setattr(module, "layer_functions", lambda *a: compiled)
    return seen
