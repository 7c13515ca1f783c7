"""Toy Triton kernels of ``prof_launch.py`` (a module of their own: triton resolves a jit
function's callees among its module's globals, and the script loads without triton)."""

import triton
import triton.language as tl


@triton.jit
def touch(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1)


@triton.jit
def _read(src_ptr, lo, hi, acc, BLOCK: tl.constexpr):
    for s in range(lo, hi, BLOCK):
        at = s + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + at, mask=at < hi, other=0.0).to(tl.float32)
    return acc


@triton.jit
def stream(src_ptr, out_ptr, per, count, BLOCK: tl.constexpr):
    """Program p sums src[p*per : (p+1)*per] (bf16, count elements) into out[p]."""
    p = tl.program_id(0)
    acc = _read(src_ptr, p * per, tl.minimum(p * per + per, count),
                tl.zeros([BLOCK], tl.float32), BLOCK)
    tl.store(out_ptr + p, tl.sum(acc))


@triton.jit
def _grid_sync(cnt_ptr, target):
    """Wait until the counter reaches ``target`` after adding this program's arrival."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _share(size, g, BLOCK: tl.constexpr):
    """Elements of a phase of ``size`` each of g programs reads (whole blocks)."""
    return tl.cdiv(tl.cdiv(size, g), BLOCK) * BLOCK


@triton.jit
def _first(src_ptr, size_ptr, base, i, p, g, PREFETCH: tl.constexpr, BLOCK: tl.constexpr,
           PHASES: tl.constexpr):
    """Program p's first block of phase i (from offset base), if PREFETCH, else zeros."""
    if PREFETCH:
        size = tl.load(size_ptr + i % PHASES)
        lo = base + p * _share(size, g, BLOCK)
        at = lo + tl.arange(0, BLOCK)
        hi = tl.minimum(lo + _share(size, g, BLOCK), base + size)
        return tl.load(src_ptr + at, mask=at < hi, other=0.0).to(tl.float32)
    return tl.zeros([BLOCK], tl.float32)


@triton.jit
def persistent(src_ptr, size_ptr, out_ptr, cnt_ptr, phases,
               BLOCK: tl.constexpr, PHASES: tl.constexpr, PREFETCH: tl.constexpr):
    """Every phase i (sizes[i % PHASES] elements from offset base) shared out over the
    programs, a grid barrier after each; PREFETCH: a phase's first block is loaded
    before the barrier that precedes it."""
    p = tl.program_id(0)
    g = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = tl.full([], 0, tl.int64)
    first = _first(src_ptr, size_ptr, base, 0, p, g, PREFETCH, BLOCK, PHASES)
    for i in range(phases):
        size = tl.load(size_ptr + i % PHASES)
        lo = base + p * _share(size, g, BLOCK)
        hi = tl.minimum(lo + _share(size, g, BLOCK), base + size)
        acc = _read(src_ptr, lo + BLOCK * PREFETCH, hi, acc + first, BLOCK)
        base += size
        first = _first(src_ptr, size_ptr, base, i + 1, p, g, PREFETCH, BLOCK, PHASES)
        _grid_sync(cnt_ptr, (i + 1) * g)
    tl.store(out_ptr + p, tl.sum(acc))
