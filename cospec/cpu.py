"""A CPU fast path for short multi-token forward passes (speculative verification).

On some CPUs MKL's sgemm is slow for a handful of rows (measured on a 2-core AMD EPYC: a
4864x896 linear layer over 4 rows cost 3x one row); there, computing ``x @ W.T`` as
``(W @ x.T).T`` — the weight on the left, over a transposed *view* of x — takes MKL's fast
path and 4 rows cost about one. On others (a 2-core Intel Xeon) the plain product is the
faster for 2–3 rows. ``SmallRowsLinear`` applies the rewrite to every ``F.linear`` call
inside it, through PyTorch's function-mode hook: no model code or weight is touched.

Which order to use is *measured* per model and row count, on the model's own forwards (as
``torch.backends.cudnn.benchmark`` does for convolutions): the first ``TRIALS`` forwards of
each row count run in each order, timed, and the faster is kept for the rest of the
process. A micro-benchmark of one layer would mislead: repeated, its weight sits in cache,
where a real forward streams every weight from memory. ``COSPEC_LINEAR`` = ``plain`` or
``weight-first`` pins one order (deterministic kernels); the default is ``auto``.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cospec import cpu_int8
from cospec.settings import choice

MAX_ROWS = 16
MIN_WIDTH = 256  # below this the rewrite's Python overhead outweighs MKL's small-row cost
TRIALS = 3       # timed forwards per order and row count before the faster is kept
MODES = ("auto", "plain", "weight-first")


class SmallRowsLinear(TorchFunctionMode):
    """Within this context, CPU ``F.linear`` over 2..``max_rows`` rows runs weight-first."""

    def __init__(self, max_rows: int = MAX_ROWS):
        super().__init__()
        self.max_rows = max_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1]
            if x.device.type == "cpu" and 1 < rows <= self.max_rows and w.dim() == 2:
                y = (w @ x.reshape(rows, -1).T).T
                if bias is not None:
                    y = y + bias
                return y.reshape(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


class OrderChoice:
    """Seconds of a model's timed forwards per row count and order; ``pick`` alternates the
    orders until each has ``TRIALS`` forwards, then keeps the one with the fastest."""

    def __init__(self):
        self.seconds: dict[int, dict[str, list[float]]] = {}

    def pick(self, rows: int) -> str:
        tried = self.seconds.setdefault(rows, {"plain": [], "weight-first": []})
        fewest = min(tried, key=lambda m: len(tried[m]))
        if len(tried[fewest]) < TRIALS:
            return fewest
        return min(tried, key=lambda m: min(tried[m]))

    def record(self, rows: int, order: str, seconds: float) -> None:
        if len(self.seconds[rows][order]) < TRIALS:
            self.seconds[rows][order].append(seconds)


_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderChoice


def linear_mode() -> str:
    """``COSPEC_LINEAR`` (``COSPEC_PLAIN_LINEAR=1``, the older switch, means ``plain``)."""
    return choice("COSPEC_LINEAR", MODES,
                  "plain" if os.environ.get("COSPEC_PLAIN_LINEAR") == "1" else "auto")


@contextlib.contextmanager
def fast_linear(model: torch.nn.Module, device: torch.device, batch: int, tokens: int,
                prefill: bool = False):
    """Run the forward of ``tokens`` new tokens for each of ``batch`` sequences inside this
    block in the order chosen for this model: a CPU model of real size, 2..MAX_ROWS rows
    (batch x tokens), else plain (a one-row step pays no function-mode overhead). A model
    given int8 copies (``cpu_int8.int8_weights``: a draft's) reads them instead in every
    forward but a ``prefill`` (the callers' mark: a prompt's tokens but its last, which the
    first step feeds), whatever the batch, so that a sequence meets one draft whatever batch
    it decodes in."""
    if not prefill and cpu_int8.has_copies(model):
        with cpu_int8.int8_forwards(model):
            yield
        return
    rows = batch * tokens
    width = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    mode = linear_mode()
    if device.type != "cpu" or width < MIN_WIDTH or not 1 < rows <= MAX_ROWS or mode == "plain":
        yield
        return
    choice = _choices.setdefault(model, OrderChoice()) if mode == "auto" else None
    order = choice.pick(rows) if choice is not None else mode
    t0 = time.perf_counter()
    with SmallRowsLinear() if order == "weight-first" else contextlib.nullcontext():
        yield
    if choice is not None:
        choice.record(rows, order, time.perf_counter() - t0)
