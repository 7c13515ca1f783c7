"""A CPU fast path for short multi-token forward passes (speculative verification).

On CPUs where MKL's sgemm is slow for a handful of rows (measured here: a 4864x896 linear
layer over 4 rows costs 3x one row), computing ``x @ W.T`` as ``(W @ x.T).T`` — the weight
on the left, over a transposed *view* of x — takes MKL's fast path: 4 rows then cost about
one. ``SmallRowsLinear`` applies that rewrite to every ``F.linear`` call inside it, through
PyTorch's function-mode hook: no model code or weight is touched.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class SmallRowsLinear(TorchFunctionMode):
    """Within this context, CPU ``F.linear`` over 2..``max_rows`` rows runs weight-first."""

    def __init__(self, max_rows: int = 16):
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


MIN_WIDTH = 256  # below this the rewrite's Python overhead outweighs MKL's small-row cost


def fast_linear(model: torch.nn.Module, device: torch.device):
    """``SmallRowsLinear`` for a CPU model of real size (unless ``COSPEC_PLAIN_LINEAR=1``),
    else nothing."""
    width = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    if (device.type == "cpu" and width >= MIN_WIDTH
            and os.environ.get("COSPEC_PLAIN_LINEAR") != "1"):
        return SmallRowsLinear()
    return contextlib.nullcontext()
