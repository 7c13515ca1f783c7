"""Int8 copies of a CPU model's linear layers for its few-row forwards (a draft's steps).

On a CPU a decode step streams every weight from memory. ``torch.ops.aten._weight_int8pack_mm``
reads int8 weights with one scale an output row over bfloat16 activations; on a 2-core AMD
EPYC (AVX2) it took a 0.5B draft's step from 181 to 76 ms in float32 (a 4864 x 896 product
0.55 against 1.50 ms; results/cpu/draft-int8/cost). Over more rows it turns compute-bound
and grows with them: at 16 rows it is about even with the float32 product's better order,
at 32 behind; so forwards of more than ``MAX_ROWS`` rows (prefill) keep the model's own
weights.

``int8_weights(model)`` makes the copies (every ``nn.Linear`` whose input width the kernel
takes, the lm_head included; embeddings stay exact) and ``int8_forwards(model)`` is the
context in which the model's forwards read them: each such linear's ``forward`` is routed to
its copy for the duration of the block and restored after it. The model's parameters are not
touched; the copies add a byte a weight.

Meant for a draft: speculative decoding checks its proposals whatever they are, so spd's
output stays the target's (greedy) or exact in distribution (sampling, the proposal
probabilities being the int8 draft's own). Methods that keep draft tokens or mix the draft's
distribution (cospec, CoS) then use the int8 draft's. The command line offers it at batch 1
(``--draft-weights int8``: generate, bench, serve with --max-batch 0), where every draft
step has few rows and only the prompt's prefill reads the draft's own weights; batched
decoders (``cospec.batched``, ``fast_batch``) built on such a draft would read the copies
only while a step has at most ``MAX_ROWS`` rows.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

from cospec.errors import CospecError

MAX_ROWS = 8  # rows (batch x new tokens) a forward may have to read the int8 copies
WIDTH_MULTIPLE = 8  # input widths the kernel takes: others crash or give wrong products
SCALE_DTYPE = torch.bfloat16  # activations and scales: the fast path (float32: ~10x slower)

Copy = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # q [n, k] int8, s [n], bias

# model -> {linear: its forward through its Copy}, made once by ``int8_weights``
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether this torch has the int8 weight kernel."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): w [n, k] rounded to int8 with one absmax scale a row, w ~ q * s[:, None]."""
    w = w.detach().float()
    s = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(SCALE_DTYPE)  # rounded first: q fits it
    q = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), s


def int8_weights(model: torch.nn.Module) -> int:
    """Make int8 copies of ``model``'s CPU linears for its few-row forwards
    (``int8_forwards``); returns how many. CospecError where torch lacks the kernel or no
    linear fits it."""
    if not available():
        raise CospecError(f"int8 draft weights on a CPU need torch's _weight_int8pack_mm, "
                          f"which torch {torch.__version__} lacks: upgrade torch or use "
                          "--draft-weights model")
    copies = {}
    for mod in model.modules():
        if (isinstance(mod, torch.nn.Linear) and mod.weight.device.type == "cpu"
                and mod.weight.shape[1] % WIDTH_MULTIPLE == 0):
            copy = (*quantize(mod.weight), None if mod.bias is None else mod.bias.detach())
            copies[mod] = lambda x, copy=copy: product(x, copy)
    if not copies:
        raise CospecError("int8 draft weights: the model has no CPU linear layer of an input "
                          f"width divisible by {WIDTH_MULTIPLE}")
    _COPIES[model] = copies
    return len(copies)


def has_copies(model: torch.nn.Module) -> bool:
    return model in _COPIES


def product(x: torch.Tensor, copy: Copy) -> torch.Tensor:
    """x [..., k] @ (q * s).T + bias -> [..., n] in x's dtype, through the int8 kernel."""
    q, s, bias = copy
    flat = x.reshape(-1, x.shape[-1]).to(SCALE_DTYPE)
    y = torch.ops.aten._weight_int8pack_mm(flat, q, s).to(x.dtype)
    y = y.reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


@contextlib.contextmanager
def int8_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Within this block ``model``'s linears with copies compute through them (the caller
    keeps the block to forwards of at most ``MAX_ROWS`` rows)."""
    copies = _COPIES.get(model, {})
    for mod, forward in copies.items():
        mod.forward = forward
    try:
        yield
    finally:
        for mod in copies:
            mod.__dict__.pop("forward", None)
