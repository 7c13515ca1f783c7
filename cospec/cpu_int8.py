"""Int8 copies of a CPU model's linear layers for its steps after the prefill (a draft's).

On a CPU a decode step streams every weight from memory. ``torch.ops.aten._weight_int8pack_mm``
reads int8 weights with one scale an output row over bfloat16 activations; on a 2-core AMD
EPYC (AVX2) it took a 0.5B draft's step from 181 to 76 ms in float32 (a 4864 x 896 product
0.55 against 1.50 ms; results/cpu/draft-int8/cost). Over more rows it turns compute-bound
and grows with them: at 16 rows it is about even with the float32 product's better order,
at 32 behind. A model's forwards after its prompts' prefill (its steps) read the copies
whatever their batch, so that a sequence meets one draft whatever batch it decodes in (its
tokens still part where float32 rounding, which the batch changes and the bfloat16
activations coarsen, tips a near tie); the prefill keeps the model's own weights.

``int8_weights(model)`` makes the copies (every ``nn.Linear`` whose input width the kernel
takes, the lm_head included; embeddings stay exact) and ``int8_forwards(model)`` is the
context in which the model's forwards read them: each such linear's ``forward`` is routed to
its copy for the duration of the block and restored after it. The model's parameters are not
touched; the copies add a byte a weight.

Meant for a draft: speculative decoding checks its proposals whatever they are, so spd's
output stays the target's (greedy) or exact in distribution (sampling, the proposal
probabilities being the int8 draft's own). Methods that keep draft tokens or mix the draft's
distribution (cospec, CoS) then use the int8 draft's, at batch 1 and in the batched lockstep
decoder (``cospec.batched``: eval's accuracy pass) alike. The batch engines
(``cospec.fast_batch``: ``serve --max-batch > 0``) compute from the weights they gathered
and read the model's own.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

from cospec.errors import CospecError

# input widths the kernel takes: on others it crashes or gives wrong products (AVX2: widths
# not a multiple of 8; AVX-512: of 16, e.g. 24, 40, 72 -- the sizes of its K loop, no tail)
WIDTH_MULTIPLE = 16
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
    """Make int8 copies of ``model``'s CPU linears for its steps (``int8_forwards``);
    returns how many. CospecError where torch lacks the kernel or no
    linear fits it."""
    if not available():
        raise CospecError(f"int8 draft weights on a CPU need torch's _weight_int8pack_mm, "
                          f"which torch {torch.__version__} lacks: upgrade torch or use "
                          "--draft-weights model")
    copies = {}
    for mod in _fitting(model):
        copy = (*quantize(mod.weight), None if mod.bias is None else mod.bias.detach())
        copies[mod] = lambda x, copy=copy: product(x, copy)
    if not copies:
        raise CospecError("int8 draft weights: the model has no CPU linear layer of an input "
                          f"width divisible by {WIDTH_MULTIPLE}")
    _COPIES[model] = copies
    return len(copies)


def _fitting(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """``model``'s CPU linears of an input width the kernel takes."""
    return [mod for mod in model.modules()
            if isinstance(mod, torch.nn.Linear) and mod.weight.device.type == "cpu"
            and mod.weight.shape[1] % WIDTH_MULTIPLE == 0]


def can_copy(model: torch.nn.Module) -> bool:
    """``int8_weights(model)`` would make copies: torch has the kernel and some linear fits it."""
    return available() and bool(_fitting(model))


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
    keeps prefills out of it)."""
    copies = _COPIES.get(model, {})
    for mod, forward in copies.items():
        mod.forward = forward
    try:
        yield
    finally:
        for mod in copies:
            mod.__dict__.pop("forward", None)
