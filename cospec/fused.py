"""Fused Triton layers for the fast path's few-row steps (decode, verify).

``fast.Engine`` (batch 1), and ``batch_lm.BatchLM`` for a forward of one row (a lone
request), run each layer of a forward over n <= MAX_ROWS tokens as five Triton kernels
(``cospec.kernels``) instead of the reference's dozen or so (RMSNorm, projections, RoPE, two
cache writes, two attention matmuls, softmax, SiLU, residual adds); everything else
(prefill, more rows, Qwen3's per-head norms, tensor-parallel shards, other dtypes) runs the
reference ``fast._qkv`` / ``_rest``. Triton is imported only when a fused layer first runs;
without it the engine keeps the reference.

When: ``fast.Engine(..., fused=True/False)`` (``BatchLM`` alike), else COSPEC_FUSED:
``auto`` (unset) on GPUs of compute capability 9 or more, where they measured faster than
the reference at every size
(H200, bf16, batch 1: 1.95x a 0.5B decode step, 1.64x a 1.5B, 1.27x a 7B;
results/gpu/h200/fused-one-row-tiles), the reference elsewhere and for models the kernels
do not take; ``1`` wherever they can run (a warning names why where they cannot); ``0`` never.

The two functions ``fused_layer_functions`` returns are drop-in replacements for
``fast._qkv`` and ``_rest`` (same arguments, same results for a 2-d ``x``), with
optional keywords the engine uses to skip work:

- ``qkv(..., cache=(kc, vc, pos))`` writes k and v straight into cache slots ``pos`` and
  returns (q, None, None); with ``rope_table=True`` too, cos and sin are the rotary tables
  [L, hd], read at rows pos;
- ``rest(..., pos=pos)`` masks by positions (token i sees slots <= pos[i]) and reads only
  the visible slots; ``bias`` is then ignored and may be None.

Both take one more keyword, ``w8``: the layer's int8 copies (``Int8`` of q/k/v, o_proj,
gate/up and down_proj, made by ``quantize``), which the kernels then read instead of w's
projections (``fast.int8_weights``; calls the kernels do not take keep w). ``logits`` is the
matching int8 lm_head, ``rms_norm`` the final norm in one kernel.

On CPU tensors the kernels run under triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is first imported: triton makes its own jit functions then): that is how the tests
check them. Their speed is a GPU question (``scripts/prof_fused.py``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

from cospec.errors import CospecError
from cospec.settings import choice

MAX_ROWS = 16        # more rows than this: the reference path
# The most tokens (rows x tokens a row) a batch engine's step of several rows, each on its own
# cache, takes through the fused layers (``batch_lm.BatchLM``; more: the compiled halves).
# 64 against 16 on an H100 (the real pair, results/gpu/h100/batch-rows-cap-real-pair): 64-row
# decode steps 1.26x, 4-row verifies at k = 4 (20 tokens) 1.10x (spd) and 1.18x (lookup),
# 8-row ones (40 tokens) level; steps of <= 16 tokens run the same code under either.
ROWS_TOKENS = 64
MODES = ("auto", "1", "0")  # the values COSPEC_FUSED takes (unset: "auto")
MEASURED_MAJOR = 9  # auto: GPUs of this compute capability (major) or more (Hopper on)
# Blocks, splits and HOIST: the best of an H200 sweep (0.5B, results/gpu/h200/
# fused-attention-combine/grid.md; the top four settings lie within 1.5 % of each other).
SPLITS = 8           # attention splits over the visible slots (a power of two)
QKV_BLOCK_C = 16     # columns of each RoPE half per q/k/v program
UP_BLOCK_N = 32      # gate (and up) columns per program
OUT_BLOCK_N = 32     # o_proj / down_proj output columns per program
BLOCK_K = 128        # reduction block of the projections
DOWN_BLOCK_K = 256   # down_proj's
# Cache slots per attention block: on an H200 (0.5B / 1.5B, 1 and 5 rows, 100 and 400 slots)
# 64 was the fastest or tied in 7 of 8 cells, up to 3 % a step faster than 32, and 1.8 %
# behind 128 in the eighth (results/gpu/h200/fused-attention-block).
ATTN_BLOCK_S = 64
# An attention block's rows x head dim x slots at most (``_attn_block_s`` halves the slots to
# fit): on sm90 the 7B's 5-row block at 64 slots (64 x 128 x 64) spills registers, at 32 not;
# the 0.5B's (64 x 64 x 64) and 1.5B's (32 x 128 x 64) fit, and were the ones measured.
ATTN_TILE = 64 * 64 * 64
# Up to this many visible slots (0: never) one program a kv head attends them all, with no
# split-K combine: on an H200 a 0.5B step at 101 slots took 0.636 ms against 0.664 split, a
# 1.5B 1.292 against 1.305; all 401 slots in one split were 12 % (0.5B) and 13 % (1.5B)
# slower (results/gpu/h200/fused-attention-one-split).
ATTN_ONE_SPLIT = 128
# Query rows an attention program takes at most (0: all of its kv head's G heads x n rows,
# one program a kv head and split). Over more, the kv head's query heads are shared out in
# chunks of max(1, ATTN_ROWS // n) heads, one program each, every one reading the kv head's
# keys and values (from L2 after the first): at a verify's 6 rows a 1.5B kv head's 36 rows
# (64 padded) take 3 programs of 12 (16). On an H200 16 made a 1.5B 6-row step 4 % faster
# at 100 slots (1.676 -> 1.602 ms) and 7 % at 400 (1.785 -> 1.661), a 0.5B's 2-3 %, 8 within
# 1 % of it; one and two rows fit 16 and are unchanged (results/gpu/h200/
# fused-few-row-attention-chunks).
ATTN_ROWS = 16
# Split-K (``cospec.kernels``' docstring): programs over each projection's reduction. 0:
# auto, enough splits that the grid has PROGRAMS_PER_SM programs for each SM (at most one
# split per reduction block; PROGRAMS_PER_SM = 0: unsplit); n > 0: n splits (at most).
# Tuned on a GPU with ``scripts/prof_fused.py --grid``: PROGRAMS_PER_SM 4 with NUM_STAGES 3
# and BLOCK_K 128 were the best or within 0.1 % at 2 and 6 rows against 3 / 6, 2 and 64
# (results/gpu/h200/fused-few-row-settings).
QKV_SPLIT_K = 0
OUT_SPLIT_K = 0
UP_SPLIT_K = 0
DOWN_SPLIT_K = 0
PROGRAMS_PER_SM = 4
NUM_WARPS = 4        # warps of every program
NUM_STAGES = 3       # software pipelining depth of the reduction loops
# Programmatic dependent launch (``cospec.kernels``' docstring; Hopper on, never interpreted):
# 0 off; 1 the next kernel starts once this one's programs are past their wait; 2 at once.
# Each program loads its hoisted weights (HOIST), then waits for the previous kernel. Only
# for models whose one-row reductions unroll (<= GEMV_UNROLL blocks of the hidden size): on an
# H200 PDL = 1 made a 0.5B step 0.616 -> 0.554 ms (0.528 with HOIST = 2), a 1.5B 1.186 ->
# 1.165, 6-row steps 8 % / 2 % faster; a 7B's (looped) 3 % slower at 1 and 6 rows; PDL = 2
# within 1 % of 1 (results/gpu/h200/fused-pdl-hoist).
PDL = 1
# q/k/v and gate/up load their first weight block before reading x (1); 2: every block of an
# unrolled one-row reduction (o_proj and down_proj too), where PDL is on and the model's
# one-row launches are not register-capped (GEMV_CAP_BLOCKS: the 0.5B), else 1. Without PDL
# every block early was no faster (0.5B 0.652 against 0.616 ms), and under the 1.5B's cap
# it spills (1.467 against 1.165 ms).
HOIST = 2
# A split-K program (the few-row steps: the verify, the draft's first step) whose share of a
# reduction is at most this many blocks loads all of its weights before the activations and
# the PDL wait (0: off; HOIST's first block then). On an H200 2 made the 1.5B's 2- and 6-row
# steps 2-3 % faster and the 0.5B's 0.5-2 % slower, and the real pair no faster
# (results/gpu/h200/fused-few-row-settings), so off.
SPLIT_EARLY = 0
# q/k/v's and gate/up's looped reductions over a few rows (the verify, the draft's first
# step) read each block's RMSNorm weights one block ahead, the first before the PDL wait (1),
# instead of in the block that uses them (0). The software pipeline leaves those loads out
# (2 bytes a thread), so at 0 every block's products wait on one (sm90 PTX of the 1.5B's 5-row
# gate/up). On an H200 1 made the 1.5B's 2- and 6-row steps 1.7 % and 1.3 % faster, a 7B's
# 1 %, the 0.5B's the same; a 7B's looped one-row step was 0.4 % slower, so one row keeps 0
# (results/gpu/h200/fused-few-row-attention-chunks).
LN_AHEAD = 1
# Registers a thread at most (0: the compiler's choice; on sm90 gate/up then takes 78, q/k/v
# 80, down_proj 56: results/gpu/h200/fused-attention-combine/resources-sm90.md).
MAX_REGS = 0
# One-row steps (decode) on their own tiles: BLOCK_M = 1 (products and sums on the CUDA
# cores, no 16-row padding), no split-K handshake, many small-tile programs, each walking its
# whole reduction, unrolled where short (GEMV_UNROLL: all its weight loads in flight at
# once). GEMV = 0: one row takes the few-row kernels' settings above. On an H200 (bf16, one
# row, same run) they made a 0.5B step 1.32x faster than those and a 1.5B 1.23x; a 7B step
# runs 1.27x the reference path's (the few-row kernels': 1.03x). The tiles below are the best
# of its sweeps (results/gpu/h200/fused-one-row-tiles: GEMV_OUT_BLOCK_N 1 over 2 by
# 0.5-6 %; GEMV_BLOCK_K, GEMV_DOWN_BLOCK_K and GEMV_WARPS within 1-2 %). More rows keep
# the few-row kernels: on these tiles 2 and 6 rows measured slower (docs/gpu.md).
GEMV = 1
# Few-row projections (2 to 16 rows: the verify, the draft's first step of a block) with the
# weight's columns on tl.dot's M side and the rows on its N side (SWAP = 1), as cuBLAS's few-row
# tiles are (192 x 8 on an H200), instead of the rows on M, padded to 16 (0). In a toy
# projection alone it streamed 3 % to 1.75x faster than rows on M; in these kernels (split-K,
# hoisted weights, the norm folded in) it moved an H100's steps by -2 to +1.4 % (1.5B 2 and
# 6 rows faster, 0.5B slower; 64-column tiles no better), so off (results/gpu/h100/
# few-row-swap).
SWAP = 0
# The step's edges (``fast.final_norm``, ``fast.positioned_layers``): 1 the final RMSNorm in
# one kernel (``rms_norm``) and q/k/v reading RoPE's cos and sin from the rotary tables at
# the cache slots; 0 torch's ops (eight launches for the norm, two gathers a step).
EDGES = 1
GEMV_QKV_BLOCK_C = 2     # columns of each RoPE half per q/k/v program
GEMV_UP_BLOCK_N = 8      # gate (and up) columns per program
GEMV_OUT_BLOCK_N = 1     # o_proj / down_proj output columns per program
GEMV_BLOCK_K = 256       # reduction block of q/k/v and gate/up
GEMV_DOWN_BLOCK_K = 1024  # of o_proj and down_proj
GEMV_WARPS = 4
GEMV_UNROLL = 8          # reductions of at most this many blocks unrolled (more: a loop). 16
                         # (the 7B's 14 gate/up blocks unrolled, 142 registers a thread) was
                         # 5 % faster on the 1.5B, 4 % slower on the 7B, equal on the 0.5B;
                         # 10 (the 1.5B's 9 down_proj blocks unrolled) gained nothing on an
                         # H100 (results/gpu/h100/one-row-settings)
# Registers a thread at most in the one-row launches of a model whose hidden size unrolls
# into GEMV_CAP_BLOCKS .. GEMV_UNROLL reduction blocks (0, or other models: MAX_REGS). Its
# unrolled gate/up needs the most: the 1.5B's (6 blocks) takes 112 uncapped and fits 4
# programs an SM (2.12 waves), 5 at 96 (1.70 waves), unspilled. On an H200 (one row, every
# one-row launch capped) 96 made a 1.5B step 1.253 -> 1.193 ms, left a 0.5B's (4 blocks, 90
# registers uncapped) at 0.618 and made a 7B's (14 blocks, looped) 3.817 -> 4.183: a cap
# raises the registers ptxas gives kernels that need fewer (the 7B's gate/up 80 -> 89, q/k/v
# 43 -> 60), so fewer fit an SM (results/gpu/h200/fused-one-row-regs).
# GEMV_CAP_ALL = 0 caps the gate/up alone (the compile report has the 1.5B's q/k/v at 56
# registers uncapped, 9 programs an SM, and 78 capped, 6); the launches it leaves uncapped then
# load every block early (HOIST = 2, ``_hoist``). On an H100 that made a 1.5B step 1.430 ->
# 1.412 ms and target-only on the real pair 1.2 % faster, spd no faster (its target steps are
# verifies); unmeasured on an H200, where the defaults were tuned, so 1 (results/gpu/h100/
# one-row-settings).
GEMV_MAX_REGS = 96
GEMV_CAP_BLOCKS = 6
GEMV_CAP_ALL = 1
# The int8 lm_head's one-row launch (``logits``): output columns per program (its reduction
# in GEMV_BLOCK_K blocks, or W8_GEMV_BLOCK_K).
HEAD_BLOCK_N = 8
# The one-row tiles of launches over int8 weights (``Int8``; 0: the bf16 launches' GEMV_*
# value, ``_tile``). A tile of the same shape holds half the bytes, and the bytes a program
# has in flight set its bandwidth (docs/gpu.md), so they are settings of their own: the int8
# draft and the bf16 target share one process. On an H200 (random 0.5B, one row) a reduction
# block of 512 for q/k/v and gate/up made the int8 step 0.538 -> 0.497 ms (the bf16 step:
# 0.535); HEAD_BLOCK_N 4 / 8 / 16 were within 1 % (results/gpu/h200/int8-draft). On an H100
# W8_GEMV_DOWN_BLOCK_K 2048 and W8_GEMV_OUT_BLOCK_N 2 were each 1.5 % slower than these (0.518
# against 0.510 ms; results/gpu/h100/int8-draft-tiles); W8_GEMV_UP_BLOCK_N is not measured.
W8_GEMV_UP_BLOCK_N = 0
W8_GEMV_OUT_BLOCK_N = 0
W8_GEMV_BLOCK_K = 512
W8_GEMV_DOWN_BLOCK_K = 0
GPU_SMS = 132        # SMs assumed off CUDA (an H200: the interpreter and compile check
                     # launch its grids)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TUNABLE = ("QKV_BLOCK_C", "UP_BLOCK_N", "OUT_BLOCK_N", "BLOCK_K", "DOWN_BLOCK_K", "ATTN_BLOCK_S",
           "ATTN_TILE", "ATTN_ONE_SPLIT", "ATTN_ROWS", "SPLITS", "QKV_SPLIT_K", "OUT_SPLIT_K",
           "UP_SPLIT_K", "DOWN_SPLIT_K", "PROGRAMS_PER_SM", "NUM_WARPS", "NUM_STAGES", "HOIST",
           "PDL", "SPLIT_EARLY", "LN_AHEAD", "MAX_REGS", "GEMV", "GEMV_QKV_BLOCK_C",
           "GEMV_UP_BLOCK_N", "GEMV_OUT_BLOCK_N", "GEMV_BLOCK_K", "GEMV_DOWN_BLOCK_K",
           "GEMV_WARPS", "GEMV_UNROLL", "GEMV_MAX_REGS", "GEMV_CAP_BLOCKS", "GEMV_CAP_ALL",
           "HEAD_BLOCK_N", "W8_GEMV_UP_BLOCK_N", "W8_GEMV_OUT_BLOCK_N", "W8_GEMV_BLOCK_K",
           "W8_GEMV_DOWN_BLOCK_K", "SWAP", "EDGES", "ROWS_TOKENS")


# Settings that size a tile (triton's ``tl.arange``) or a launch's warps: a power of two
# (the W8_ ones 0 too: the bf16 launches' value).
POWERS_OF_TWO = ("QKV_BLOCK_C", "UP_BLOCK_N", "OUT_BLOCK_N", "BLOCK_K", "DOWN_BLOCK_K",
                 "ATTN_BLOCK_S", "SPLITS", "NUM_WARPS", "GEMV_QKV_BLOCK_C", "GEMV_UP_BLOCK_N",
                 "GEMV_OUT_BLOCK_N", "GEMV_BLOCK_K", "GEMV_DOWN_BLOCK_K", "GEMV_WARPS",
                 "HEAD_BLOCK_N", "W8_GEMV_UP_BLOCK_N", "W8_GEMV_OUT_BLOCK_N", "W8_GEMV_BLOCK_K",
                 "W8_GEMV_DOWN_BLOCK_K", "ROWS_TOKENS")

class Int8(NamedTuple):
    """A weight w [rows, k] kept as int8 ``q`` [rows, k] and float32 ``s`` [rows], one scale
    a row: w ~ q * s[:, None] (``quantize``). The kernels multiply a row's sums by its scale
    (x @ (q * s).T computed as (x @ q.T) * s), so they read one byte a weight."""

    q: torch.Tensor
    s: torch.Tensor


def quantize(w: torch.Tensor) -> Int8:
    """w [rows, k] rounded to int8 with one absmax scale a row (s = max |w[r]| / 127, 1 for
    an all-zero row): |w - q * s| <= s / 2 elementwise. A copy: w is unchanged."""
    with torch.no_grad():
        w32 = w.detach().to(torch.float32)
        s = w32.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(w32 / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8(q.contiguous(), s.contiguous())


def dequantized(w8: Int8, dtype: torch.dtype) -> torch.Tensor:
    """q * s[:, None] in ``dtype``: the weight an int8 copy stands for (the tests' reference)."""
    return (w8.q.to(torch.float32) * w8.s[:, None]).to(dtype)


def configure(items: list[str]) -> None:
    """Apply settings given as "NAME=VALUE" (NAME one of TUNABLE, VALUE an integer, a power of
    two for POWERS_OF_TWO) to this module for the rest of the
    process: how scripts such as ``prof_fused.py`` take them. A CospecError names the first
    bad one."""
    for item in items:
        name, _, value = item.partition("=")
        if name not in TUNABLE or not value.lstrip("-").isdigit():
            raise CospecError(f"fused setting {item!r}: NAME=INTEGER, NAME one of "
                              f"{', '.join(TUNABLE)}")
        number = int(value)
        if name in POWERS_OF_TWO and not (number > 0 and number & (number - 1) == 0
                                          or number == 0 and name.startswith("W8_")):
            raise CospecError(f"fused setting {item!r}: {name} is a power of two"
                              + (" (or 0)" if name.startswith("W8_") else ""))
        globals()[name] = number


def mode(flag: bool | None = None) -> str:
    """"1" (fused layers asked for), "0" (not) or "auto": ``flag`` if given, else COSPEC_FUSED
    (``settings.choice``: any other value is a CospecError naming the accepted ones)."""
    if flag is not None:
        return "1" if flag else "0"
    return choice("COSPEC_FUSED", MODES, "auto")


def asked(device: torch.device, flag: bool | None = None) -> str | None:
    """``mode(flag)`` where it runs the fused layers on ``device`` ("1"; "auto" on the GPUs
    where they measured faster), else None (the shapes aside: ``unsupported``)."""
    chosen = mode(flag)
    if chosen == "0" or chosen == "auto" and not measured_faster(device):
        return None
    return chosen


def measured_faster(device: torch.device) -> bool:
    """``auto``'s test: a CUDA GPU of compute capability MEASURED_MAJOR or more."""
    return (device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= MEASURED_MAJOR)


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels() -> ModuleType:
    """``cospec.kernels`` (imported on first use)."""
    from cospec import kernels

    return kernels


def unsupported(engine) -> str | None:
    """Why the fused kernels cannot run ``engine``'s layers (a ``fast.Engine``), or None."""
    if engine.group is not None:
        return "a tensor-parallel shard"
    why = unsupported_shape(engine.device, engine.dtype, engine.heads, engine.kv_heads,
                            engine.head_dim, engine.layers[0][3] is not None)
    if why is None and not all(t is None or t.is_contiguous() for w in engine.layers for t in w):
        return "non-contiguous weights"
    return why


def unsupported_shape(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                      head_dim: int, head_norms: bool) -> str | None:
    """Why the fused kernels cannot run layers of these shapes on ``device``, or None
    (``unsupported`` for an engine; ``fast.fused_runs`` for a model before its engines)."""
    cuda = device.type == "cuda"
    if not _has_triton():
        return "triton is not installed"
    if not cuda and not interpret():
        return f"{device.type} tensors need TRITON_INTERPRET=1"
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    if head_dim & (head_dim - 1) or head_dim < (32 if cuda else 2):
        return f"head_dim {head_dim} (a power of two >= 32 on CUDA)"
    if heads % kv_heads:
        return f"{heads} heads over {kv_heads} kv heads"
    if head_norms:
        return "per-head q/k norms (Qwen3)"
    return None


def rows_fit(x: torch.Tensor) -> bool:
    """The fused kernels take x: 2-d and contiguous, <= MAX_ROWS rows, a dtype they know, on
    CUDA or under the interpreter."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype in DTYPES
            and x.is_contiguous() and (x.device.type == "cuda" or interpret()))


def _fits(x: torch.Tensor, w: tuple) -> bool:
    """The fused kernels take this call: ``rows_fit(x)`` and no per-head norms."""
    return rows_fit(x) and w[3] is None


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rows(n: int) -> int:
    """Row block of a kernel over n rows (tl.dot wants >= 16)."""
    return max(16, _pow2(n))


def _heads_per_program(group: int, n: int) -> int:
    """Query heads of a kv head (``group`` of them) one attention program takes over n rows:
    all while group * n <= ATTN_ROWS or ATTN_ROWS is 0, else max(1, ATTN_ROWS // n)."""
    if ATTN_ROWS <= 0 or group * n <= ATTN_ROWS:
        return group
    return max(1, ATTN_ROWS // n)


def _attn_block_s(block_r: int, hd: int) -> int:
    """Slots an attention block of ``block_r`` rows of head dim ``hd`` walks at once:
    ATTN_BLOCK_S, halved (not below 16) while block_r x hd x slots > ATTN_TILE."""
    slots = ATTN_BLOCK_S
    while slots > 16 and block_r * hd * slots > ATTN_TILE:
        slots //= 2
    return slots


@functools.cache
def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (GPU_SMS off CUDA)."""
    if device.type != "cuda":
        return GPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(tiles: int, blocks: int, asked: int, device: torch.device) -> tuple[int, int]:
    """(splits, blocks per split) of a reduction of ``blocks`` blocks under ``tiles`` output
    tiles: ``asked`` splits if > 0, else enough for PROGRAMS_PER_SM programs an SM; never
    more than ``blocks``, and rounded so that no split is empty."""
    want = asked if asked > 0 else _cdiv(PROGRAMS_PER_SM * _sms(device), tiles)
    per = _cdiv(blocks, max(1, min(want, blocks)))
    return _cdiv(blocks, per), per


_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Counter buffers outgrown or set aside (``fresh_counters``), kept for the process: a CUDA graph
# captured on one reads it at every replay, and a graph keeps none of its tensors alive (freed,
# its memory would go to other tensors, which the graph's split-K launches would then count
# in). An int8 lm_head's one-row launch (151,936 rows: 18,992 tiles) outgrows the first one
# after the target's graphs are captured.
_RETIRED: list[torch.Tensor] = []


def counters(device: torch.device, size: int) -> torch.Tensor:
    """Split-K tile counters of ``device``: int32 zeros, kept (the kernels leave them zero),
    at least ``size``. Made on the first (eager) call of a shape, before any CUDA graph
    captures it; a buffer outgrown stays alive (``_RETIRED``)."""
    have = _COUNTERS.get(device)
    if have is None or len(have) < size:
        fresh_counters(device)
        have = _COUNTERS[device] = torch.zeros(max(size, 4096), dtype=torch.int32,
                                               device=device)
    return have


def fresh_counters(device: torch.device) -> None:
    """Let the launches on ``device`` from now on take a new counter buffer (the one before
    kept: graphs captured on it still read it). For kernels that run at the same time, on
    two streams: sharing counters, they would mix their counts."""
    have = _COUNTERS.pop(device, None)
    if have is not None:
        _RETIRED.append(have)


def _workspace(x: torch.Tensor, splits: int, width: int) -> torch.Tensor:
    """Partial sums [splits, n, width] (float32) of a split-K launch; x itself if unsplit."""
    if splits == 1:
        return x
    return torch.empty(splits, x.shape[0], width, dtype=torch.float32, device=x.device)


def _gemv(n: int) -> bool:
    """A projection over n rows takes the one-row tiles (GEMV_*): GEMV on and n = 1."""
    return bool(GEMV) and n == 1


def _block_m(gemv: bool, n: int) -> int:
    """Row block of a projection over n rows: 1 on the one-row tiles, else ``_rows(n)``."""
    return 1 if gemv else _rows(n)


def _swap(gemv: bool) -> bool:
    """A projection launch takes SWAP: few rows (not the one-row tiles) and SWAP on."""
    return bool(SWAP) and not gemv


def _unroll(gemv: bool, blocks: int) -> bool:
    """A one-row projection's reduction of ``blocks`` blocks is unrolled (<= GEMV_UNROLL)."""
    return gemv and blocks <= GEMV_UNROLL


def _tile(name: str, w8: bool) -> int:
    """One-row tile setting ``name`` (GEMV_*) of a launch: W8_``name`` where the launch reads
    int8 weights and that is set, else ``name``."""
    return (w8 and globals()["W8_" + name]) or globals()[name]


def _blocks(d: int, w8: bool = False) -> int:
    """Reduction blocks of a one-row projection over the hidden size d (GEMV_BLOCK_K each, or
    W8_GEMV_BLOCK_K over int8 weights)."""
    return _cdiv(d, min(_tile("GEMV_BLOCK_K", w8), _pow2(d)))


def _hopper(device: torch.device) -> bool:
    """Kernels on ``device`` can launch with PDL: a Hopper or newer GPU, not interpreted."""
    return (device.type == "cuda" and not interpret()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _pdl(device: torch.device, d: int) -> int:
    """The PDL mode of launches on ``device`` for a model of hidden size ``d``: PDL where
    the GPU takes it and the one-row reductions unroll (<= GEMV_UNROLL blocks), else 0."""
    return PDL if _hopper(device) and _blocks(d) <= GEMV_UNROLL else 0


def _capped(d: int, gate_up: bool = False, w8: bool = False) -> bool:
    """A one-row launch of a model of hidden size ``d`` takes GEMV_MAX_REGS: its reductions
    unroll into GEMV_CAP_BLOCKS .. GEMV_UNROLL blocks, and it is the gate/up's or
    GEMV_CAP_ALL caps them all (``w8``: over int8 weights, blocks of W8_GEMV_BLOCK_K)."""
    blocks = _blocks(d, w8)
    return bool(GEMV_MAX_REGS and GEMV_CAP_BLOCKS <= blocks <= GEMV_UNROLL
                and (GEMV_CAP_ALL or gate_up))


def _hoist(d: int, w8: bool = False, gate_up: bool = False) -> int:
    """HOIST of a launch for a model of hidden size ``d`` (``w8``: over int8 weights;
    ``gate_up``: the gate/up's): 2 only with PDL set, where the one-row reductions unroll
    (<= GEMV_UNROLL blocks) and the launch is not register-capped (``_capped``: under a cap
    ptxas spills with every block early); else at most 1."""
    if (HOIST == 2 and PDL and _blocks(d, w8) <= GEMV_UNROLL
            and not _capped(d, gate_up, w8)):
        return 2
    return min(HOIST, 1)


def _split_early(per: int) -> int:
    """SPLIT_EARLY of a launch whose splits each reduce ``per`` blocks: per when SPLIT_EARLY
    allows as many, else 0."""
    return per if 0 < per <= SPLIT_EARLY else 0


def _ln_ahead(gemv: bool) -> bool:
    """LN_AHEAD of a q/k/v or gate/up launch: the few-row launches only, not the one-row
    tiles' (a 7B's looped one-row step measured slower with it)."""
    return bool(LN_AHEAD) and not gemv


def _launch(device: torch.device, gemv: bool = False, d: int = 0, gate_up: bool = False,
            w8: bool = False) -> dict:
    """A launch's num_warps, num_stages, register cap (GEMV_* on the one-row tiles of a
    model of hidden size ``d``; ``gate_up``: the gate/up projection's; ``w8``: over int8
    weights, its blocks counted in W8_GEMV_BLOCK_K) and PDL mode."""
    regs = GEMV_MAX_REGS if gemv and _capped(d, gate_up, w8) else MAX_REGS
    pdl = _pdl(device, d)
    return {"num_warps": GEMV_WARPS if gemv else NUM_WARPS, "num_stages": NUM_STAGES,
            "PDL": pdl, **({"maxnreg": regs} if regs else {}),
            **({"launch_pdl": True} if pdl else {})}


def visibility_bias(pos: torch.Tensor, length: int, group: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    """The reference's additive mask [group * n, length]: 0 where slot <= pos[i], -inf
    elsewhere, rows j*n + i."""
    visible = torch.arange(length, device=pos.device)[None, :] <= pos[:, None]
    bias = torch.zeros(visible.shape, dtype=dtype, device=pos.device)
    return bias.masked_fill(~visible, float("-inf")).repeat(group, 1)


def rms_qkv_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: tuple, heads: int,
                 kv_heads: int, eps: float, cache: tuple | None = None, w8: tuple | None = None,
                 rope_table: bool = False, per_row: bool = False, row_tokens: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``fast._qkv`` in one kernel: x [n, d], cos, sin [n, hd] -> q [H, n, hd] and k, v
    [KVH, n, hd]; with ``cache=(kc, vc, pos)`` k and v go to slots pos of kc, vc
    [KVH, L, hd] instead and (q, None, None) is returned. ``rope_table`` (with a cache):
    cos, sin are the rotary tables [L, hd], read at rows pos (a token's position is its
    slot), so no step gathers them first. ``w8``: the layer's int8 copies (``Int8`` of q/k/v,
    o, gate/up, down), read instead of w's projections. ``per_row`` (with a cache): the rows
    of x are ``row_tokens`` tokens a sequence, each sequence on a cache row of its own, kc,
    vc [rows, KVH, L, hd], row i's k and v written to slot pos[i] of cache row
    i // row_tokens (a batch's decode or verify step)."""
    if rope_table and cache is None:
        raise ValueError("rope_table reads the rotary tables at the cache slots: give cache")
    if per_row and cache is None:
        raise ValueError("per_row writes each row's k and v to its own cache row: give cache")
    ln1, qkv_w, qkv_b = w[:3]
    qkv8 = w8[0] if w8 is not None else None
    n, d = x.shape
    hd = qkv_w.shape[0] // (heads + 2 * kv_heads)
    q = x.new_empty(heads, n, hd)
    if cache is None:
        k, v = x.new_empty(kv_heads, n, hd), x.new_empty(kv_heads, n, hd)
        slots = torch.arange(n, device=x.device)
    else:
        k, v, slots = cache
    half = hd // 2
    gemv = _gemv(n)
    block_c = min(half, GEMV_QKV_BLOCK_C if gemv else QKV_BLOCK_C)
    w8_on = qkv8 is not None
    block_k = min(_tile("GEMV_BLOCK_K", w8_on) if gemv else BLOCK_K, _pow2(d))
    tiles = (heads + 2 * kv_heads, half // block_c)
    splits, per = split_k(tiles[0] * tiles[1], _cdiv(d, block_k), 1 if gemv else QKV_SPLIT_K,
                          x.device)
    _kernels().rms_qkv_rope[(*tiles, splits)](
        x, ln1, qkv_w if qkv8 is None else qkv8.q, qkv_w if qkv_b is None else qkv_b,
        qkv_w if qkv8 is None else qkv8.s, cos.contiguous(), sin.contiguous(),
        slots, q, k, v, _workspace(x, splits, qkv_w.shape[0]),
        counters(x.device, tiles[0] * tiles[1]), n, k.shape[-2],
        k.shape[1] * k.shape[2] if per_row else 0, row_tokens, per * block_k, eps,
        D=d, HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=hd, HAS_BIAS=qkv_b is not None,
        W8=w8_on, IEEE=x.dtype == torch.float32, SPLIT_K=splits,
        BLOCK_M=_block_m(gemv, n), BLOCK_C=block_c, BLOCK_K=block_k, HOIST=_hoist(d, w8_on),
        UNROLL=_unroll(gemv, _cdiv(d, block_k)), SPLIT_EARLY=_split_early(per),
        LN_AHEAD=_ln_ahead(gemv), SWAP=_swap(gemv), ROPE_TABLE=rope_table,
        **_launch(x.device, gemv, d, w8=w8_on))
    return (q, k, v) if cache is None else (q, None, None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``fast._rms`` in one kernel (the final norm of a fused step): x [n, d] with
    ``rows_fit(x)``, w [d] -> [n, d] in x's dtype."""
    n, d = x.shape
    y = torch.empty_like(x)
    _kernels().rms_norm[(n,)](x, w, y, eps, D=d, BLOCK_D=_pow2(d), **_launch(x.device, d=d))
    return y


def attention_mlp(x: torch.Tensor, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  bias: torch.Tensor | None, w: tuple, scale: float, eps: float,
                  pos: torch.Tensor | None = None, w8: tuple | None = None,
                  per_row: bool = False, row_tokens: int = 1) -> torch.Tensor:
    """``fast._rest`` in four kernels (attention, o_proj, gate/up, down): x [n, d],
    q [H, n, hd], kc, vc [KVH, L, hd] -> the layer's output [n, d]. Masked by ``pos`` [n]
    (slot <= pos[i]) if given, else by the additive ``bias`` [G*n, L] (or [1, G*n, L]).
    ``w8``: the layer's int8 copies (``rms_qkv_rope``'s), read instead of w's projections.
    ``per_row`` (with ``pos``): the rows of x are ``row_tokens`` tokens a sequence, each on
    a cache row of its own, kc, vc [rows, KVH, L, hd], row i attending slots <= pos[i] of
    cache row i // row_tokens (a batch's decode or verify step)."""
    if per_row and pos is None:
        raise ValueError("per_row masks each row by its position: give pos")
    ow, ob, ln2, gate_up_w, dw = w[5:]
    _, o8, gate_up8, down8 = w8 if w8 is not None else (None,) * 4
    q = q.contiguous()  # the reference's q is a transposed view
    heads, n, hd = q.shape
    kv_heads, length, _ = kc.shape[-3:]
    group = heads // kv_heads
    d = x.shape[1]
    inter = gate_up_w.shape[0] // 2
    ieee, gemv = x.dtype == torch.float32, _gemv(n)
    kern = _kernels()
    parts = torch.empty(SPLITS, heads, n, hd, dtype=torch.float32, device=x.device)
    top = torch.empty(SPLITS, heads, n, dtype=torch.float32, device=x.device)
    denom = torch.empty_like(top)
    if pos is None:
        bias = bias.reshape(group * n, length).contiguous()
    attn = x.new_empty(n, heads * hd)
    per = group if per_row else _heads_per_program(group, n)
    chunks = n if per_row else _cdiv(group, per)  # per row: a program a token
    block_r = _rows(per if per_row else per * n)
    kern.attend[(kv_heads, SPLITS, chunks)](
        q, kc, vc, q if pos is None else pos, q if pos is not None else bias, parts, top, denom,
        attn, counters(x.device, kv_heads * chunks), n, length,
        kv_heads * length if per_row else 0, row_tokens, scale, HEADS=heads, GROUP=group,
        HEAD_DIM=hd, SPLITS=SPLITS, USE_POS=pos is not None, IEEE=ieee, BLOCK_R=block_r,
        BLOCK_S=_attn_block_s(block_r, hd), ONE_S=ATTN_ONE_SPLIT, HEADS_PER=per,
        PER_ROW=per_row, **_launch(x.device, d=d))
    x1 = project_residual(attn, ow, ob, x, OUT_SPLIT_K, min(BLOCK_K, _pow2(heads * hd)), o8)
    act = x.new_empty(n, inter)
    w8_on = gate_up8 is not None
    block_n = _tile("GEMV_UP_BLOCK_N", w8_on) if gemv else UP_BLOCK_N
    tiles = _cdiv(inter, block_n)
    block_k = min(_tile("GEMV_BLOCK_K", w8_on) if gemv else BLOCK_K, _pow2(d))
    splits, per = split_k(tiles, _cdiv(d, block_k), 1 if gemv else UP_SPLIT_K, x.device)
    kern.rms_gate_up[(tiles, splits)](
        x1, ln2, gate_up_w if gate_up8 is None else gate_up8.q,
        gate_up_w if gate_up8 is None else gate_up8.s, act, _workspace(x, splits, 2 * inter),
        counters(x.device, tiles), n, inter, per * block_k, eps, D=d, W8=w8_on, IEEE=ieee,
        SPLIT_K=splits, BLOCK_M=_block_m(gemv, n), BLOCK_N=block_n, BLOCK_K=block_k,
        HOIST=_hoist(d, w8_on, gate_up=True), UNROLL=_unroll(gemv, _cdiv(d, block_k)),
        SPLIT_EARLY=_split_early(per), LN_AHEAD=_ln_ahead(gemv), SWAP=_swap(gemv),
        **_launch(x.device, gemv, d, gate_up=True, w8=w8_on))
    return project_residual(act, dw, None, x1, DOWN_SPLIT_K, min(DOWN_BLOCK_K, _pow2(inter)),
                            down8)


def project_residual(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor,
                     asked: int, block_k: int, w8: Int8 | None = None) -> torch.Tensor:
    """x + (a @ w.T + b) in one kernel (``kernels.down_residual``): a [n, k], w [d, k], b [d]
    or None, x [n, d]; split-K over k's blocks of ``block_k`` (``asked`` splits, 0: auto), or
    for one row under GEMV unsplit, in blocks of GEMV_DOWN_BLOCK_K. ``w8``: w's int8 copy,
    read instead of w."""
    n, k = a.shape
    gemv = _gemv(n)
    if gemv:
        asked, block_k = 1, min(_tile("GEMV_DOWN_BLOCK_K", w8 is not None), _pow2(k))
    return _project(a, w, b, x, torch.empty_like(x), asked, block_k,
                    _tile("GEMV_OUT_BLOCK_N", w8 is not None) if gemv else OUT_BLOCK_N, w8,
                    x.shape[1])


def logits(h: torch.Tensor, w8: Int8, b: torch.Tensor | None) -> torch.Tensor:
    """h @ w.T + b of the int8 lm_head w8 (vocabulary V rows): h [n, d] -> [n, V] in h's
    dtype. One row: unsplit, HEAD_BLOCK_N columns a program, in blocks of GEMV_BLOCK_K (or
    W8_GEMV_BLOCK_K)."""
    n, d = h.shape
    vocab = w8.q.shape[0]
    y = h.new_empty(n, vocab)
    if _gemv(n):
        return _project(h, w8.q, b, None, y, 1, min(_tile("GEMV_BLOCK_K", True), _pow2(d)),
                        HEAD_BLOCK_N, w8, d)
    return _project(h, w8.q, b, None, y, OUT_SPLIT_K, min(BLOCK_K, _pow2(d)), OUT_BLOCK_N, w8,
                    d)


def _project(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor | None,
             y: torch.Tensor, asked: int, block_k: int, block_n: int, w8: Int8 | None,
             d: int) -> torch.Tensor:
    """y = x + (a @ w.T + b) (x None: no residual) through ``kernels.down_residual``, w8's
    int8 rows and scales read instead of w where given; ``d``: the model's hidden size (its
    launch settings)."""
    n, k = a.shape
    gemv = _gemv(n)
    width = y.shape[1]
    tiles = _cdiv(width, block_n)
    splits, per = split_k(tiles, _cdiv(k, block_k), asked, y.device)
    _kernels().down_residual[(tiles, splits)](
        a, w if w8 is None else w8.q, w if b is None else b, w if w8 is None else w8.s,
        y if x is None else x, y, _workspace(y, splits, width), counters(y.device, tiles),
        n, k, per * block_k, D=width, HAS_BIAS=b is not None, W8=w8 is not None,
        RESIDUAL=x is not None, IEEE=a.dtype == torch.float32, SPLIT_K=splits,
        BLOCK_M=_block_m(gemv, n), BLOCK_N=block_n, BLOCK_K=block_k,
        K_BLOCKS=_cdiv(k, block_k) if _unroll(gemv, _cdiv(k, block_k)) else 0,
        HOIST=_hoist(d, w8 is not None), SPLIT_EARLY=_split_early(per), SWAP=_swap(gemv),
        **_launch(y.device, gemv, d, w8=w8 is not None))
    return y


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fused_layer_functions(base: tuple) -> tuple[bool, bool, Callable, Callable]:
    """``fast.layer_functions``' (use graphs, compiled, qkv, rest) with qkv and rest replaced
    by the fused ones, which hand any call they do not take (``_fits``) to the originals."""
    use_graphs, compiled, qkv_ref, rest_ref = base

    def qkv(x, cos, sin, w, heads, kv_heads, eps, cache=None, w8=None, rope_table=False):
        if (_fits(x, w) and cos.dim() == 2 and cos.shape == sin.shape
                and (rope_table and cache is not None or len(cos) == len(x))):
            return rms_qkv_rope(x, cos, sin, w, heads, kv_heads, eps, cache, w8, rope_table)
        if rope_table:
            cos, sin = cos[cache[2]], sin[cache[2]]
        q, k, v = qkv_ref(x, cos, sin, w, heads, kv_heads, eps)
        if cache is None:
            return q, k, v
        kc, vc, pos = cache
        kc.index_copy_(1, pos, k)
        vc.index_copy_(1, pos, v)
        return q, None, None

    def rest(x, q, kc, vc, bias, w, scale, eps, group=None, pos=None, w8=None):
        if group is None and _fits(x, w) and q.dim() == 3:
            return attention_mlp(x, q, kc, vc, bias, w, scale, eps, pos, w8)
        if pos is not None:
            bias = visibility_bias(pos, kc.shape[-2], q.shape[-3] // kc.shape[-3], x.dtype)
        return rest_ref(x, q, kc, vc, bias, w, scale, eps, group)

    return use_graphs, compiled, qkv, rest
