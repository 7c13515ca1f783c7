"""Capture a ``fast_batch.BatchEngine``'s CUDA graphs before it serves.

An engine captures one graph per (model, rows bucket b, tokens n, cache span) the first time
a step runs that shape: a request that brings a new shape (more rows live, a longer row, a
first request at all) waits for the capture. ``warm_up`` runs every such forward once, on an
idle engine: every rows bucket (``BatchEngine.buckets``) x every span a step may attend over
(``spans``, up to max_len) x every (model, n) its step runs (``forwards``: target-only the
target over 1 token; spd and CoSpec the draft over 2 and 1, the target over k + 1; CoS the
proposer over 2 and 1, each verifier over k + 1). After it no step captures anything.

The forwards are the models' own ``BatchLM.run`` on dummy tokens at positions 0..n-1 of slots
0..b-1. Those slots are free, so nothing reads what they write: a request admitted later
prefills its slot from position 0, and a step writes every position before a query reads it
(``fast_batch``'s invariants). Stats, queue and request ids are untouched. Models without
graphs (CPU, ``graphs=False``) have nothing to capture and are skipped. With
COSPEC_PREFILL=graphs or all-graphs (the default; ``fast.prefill_mode``) it also captures
each model's prefill graph of every padded shape (``BatchLM.prefill_shapes``: passes into
slots 0..b-1, free too); with
COSPEC_PREFILL=compiled it runs prefill passes of one and of two rows, so that their compiles
happen here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cospec import batch_lm
from cospec.errors import CospecError
from cospec.fast_batch import BatchEngine

PREFILL_WARM = 16  # prompt tokens of the warm-up's prefill passes


@dataclass(frozen=True)
class WarmUp:
    """What ``warm_up`` did: graphs captured (0: nothing to capture), the rows buckets, spans
    and tokens per forward it covered, and its wall time."""

    captured: int
    buckets: tuple[int, ...]
    spans: tuple[int, ...]
    tokens: tuple[int, ...]
    seconds: float
    prefill: int = 0  # prefill graphs captured (graph prefill)

    def __str__(self) -> str:
        if not self.tokens:
            return "nothing to capture (no CUDA graphs)"
        extra = f" and {self.prefill} prefill graphs" if self.prefill else ""
        return (f"{self.captured} CUDA graphs (rows {list(self.buckets)} x spans "
                f"{list(self.spans)} x tokens {list(self.tokens)}){extra} in "
                f"{self.seconds:.1f} s")


def captures(device: torch.device) -> bool:
    """Whether a ``BatchEngine`` built on ``device`` captures CUDA graphs (by default: on
    CUDA)."""
    return batch_lm.layer_functions(device, None, False)[0]


def warm_up(engine: BatchEngine, progress: bool = True) -> WarmUp:
    """Capture every graph ``engine``'s steps can use (a tqdm bar with ``progress``).

    The engine must have no request in a slot (queued ones are fine: they have not touched
    the caches); it is left as it was, its graphs captured.
    """
    if any(r is not None for r in engine.slots):
        raise CospecError("warm up an engine before it decodes: its slots hold requests")
    t0 = time.perf_counter()
    forwards = [(lm, n) for lm, n in engine.forwards() if lm.use_graphs]
    buckets, spans = engine.buckets(), engine.spans()
    before = sum(len(lm.graphs) for lm in engine.models)
    # the largest shapes first, so that the smaller ones reuse their memory in the graph pool
    todo = [(lm, n, b, span) for span in reversed(spans) for b in reversed(buckets)
            for lm, n in forwards]
    with torch.inference_mode():
        for lm, n, b, span in tqdm(todo, desc="warm-up", unit="graph",
                                   disable=not progress or not todo):
            lm.span = span
            pos = torch.arange(n, device=lm.device).expand(b, n)
            lm.run(torch.zeros_like(pos), pos)
        had = sum(len(lm.prefill_graphs) for lm in engine.models)
        prefills = [(lm, b, n) for lm in engine.models if lm.graph_prefill
                    for b, n in lm.prefill_shapes()]  # the largest first, as above
        for lm, b, n in tqdm(prefills, desc="warm-up prefill", unit="graph",
                             disable=not progress or not prefills):
            lm.prefill_graph([([0] * n, s) for s in range(b)])
        for lm in engine.models:  # a compiled prefill (fast.prefill_mode) compiles here:
            if lm.compiled_prefill:  # one row (dynamo specializes 1) and several
                for b in sorted({1, min(2, engine.rows)}):
                    lm.prefill([[0] * PREFILL_WARM] * b, list(range(b)))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    captured = sum(len(lm.graphs) for lm in engine.models) - before
    return WarmUp(captured, tuple(buckets) if forwards else (), tuple(spans) if forwards else (),
                  tuple(sorted({n for _, n in forwards})), time.perf_counter() - t0,
                  prefill=sum(len(lm.prefill_graphs) for lm in engine.models) - had)
