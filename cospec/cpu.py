"""A CPU fast path for short multi-token forward passes (speculative verification).

On some CPUs MKL's sgemm is slow for a handful of rows (measured on a 2-core AMD EPYC: a
4864x896 linear layer over 4 rows cost 3x one row); there, computing ``x @ W.T`` as
``(W @ x.T).T`` — the weight on the left, over a transposed *view* of x — takes MKL's fast
path and 4 rows cost about one. On others (a 2-core Intel Xeon) the plain product is the
faster one. So ``SmallRowsLinear`` *measures* both orders the first time it meets a
(rows, weight shape) in this process and uses the faster from then on; it applies to every
``F.linear`` call inside it, through PyTorch's function-mode hook: no model code or weight
is touched. ``COSPEC_LINEAR`` = ``auto`` (default), ``plain`` or ``weight-first`` forces a
choice (``cospec verify-cost`` times all three).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 16
MIN_WIDTH = 256  # below this the rewrite's Python overhead outweighs MKL's small-row cost
MODES = ("auto", "plain", "weight-first")
_weight_first_wins: dict[tuple[int, int, int], bool] = {}  # (rows, out, in) -> measured


def _weight_first(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for x [rows, in], w [out, in], computed as ``(w @ x.T).T``."""
    return (w @ x.T).T


def _seconds(fn, reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def weight_first_faster(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``(w @ x.T).T`` beats ``F.linear(x, w)`` here for this shape (x [rows, in]):
    measured once per process and shape (best of 3 each), then remembered."""
    key = (x.shape[0], *w.shape)
    if key not in _weight_first_wins:
        _weight_first_wins[key] = (_seconds(lambda: _weight_first(x, w))
                                   < _seconds(lambda: F.linear(x, w)))
    return _weight_first_wins[key]


class SmallRowsLinear(TorchFunctionMode):
    """Within this context, CPU ``F.linear`` over 2..``max_rows`` rows runs weight-first
    where that is faster on this machine (``mode="auto"``), or always
    (``mode="weight-first"``)."""

    def __init__(self, max_rows: int = MAX_ROWS, mode: str = "auto"):
        super().__init__()
        self.max_rows, self.mode = max_rows, mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1]
            if x.device.type == "cpu" and 1 < rows <= self.max_rows and w.dim() == 2:
                x2 = x.reshape(rows, -1)
                if self.mode == "weight-first" or weight_first_faster(x2, w):
                    y = _weight_first(x2, w)
                    if bias is not None:
                        y = y + bias
                    return y.reshape(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


def linear_mode() -> str:
    """``COSPEC_LINEAR`` (``COSPEC_PLAIN_LINEAR=1``, the older switch, means ``plain``)."""
    mode = os.environ.get("COSPEC_LINEAR") or (
        "plain" if os.environ.get("COSPEC_PLAIN_LINEAR") == "1" else "auto")
    if mode not in MODES:
        from cospec.errors import CospecError

        raise CospecError(f"COSPEC_LINEAR={mode!r}: choose from {', '.join(MODES)}")
    return mode


def fast_linear(model: torch.nn.Module, device: torch.device, rows: int):
    """``SmallRowsLinear`` for a CPU model of real size over a forward of ``rows`` rows
    (batch x new tokens) that it can serve, else nothing (a one-row step then pays no
    function-mode overhead)."""
    width = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    mode = linear_mode()
    if (device.type == "cpu" and width >= MIN_WIDTH and 1 < rows <= MAX_ROWS
            and mode != "plain"):
        return SmallRowsLinear(mode=mode)
    return contextlib.nullcontext()
