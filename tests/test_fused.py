"""The fused Triton layers (``cospec.fused``) compute what the reference layer computes.

On CPU the kernels run under triton's interpreter (TRITON_INTERPRET=1, see below): each
kernel against ``fast._qkv`` / ``_rest`` in float32 on tiny shapes (GQA, several row counts,
cache lengths and block sizes, stale cache slots, split-K unsplit, uneven and as fine as it
goes; the interpreter runs a tile's programs in order, so which one arrives last is never
varied), a tiny Qwen2's logits through the fused
``Engine`` against transformers' forward, and greedy decoding through the loop. Not covered
on CPU: compiled (not interpreted) kernels, CUDA graph capture and bfloat16 rounding —
``test_cuda_graphs`` checks those where a GPU is present. Skipped without triton (it is not
a dependency of the package).
"""

import gc
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from cospec import fast, fused
from cospec.acceptance import ExactRule
from cospec.decoding import CachedLM, generate
from cospec.errors import CospecError

# Triton makes its own jit functions (tl.zeros, ...) when first imported, and torch imports
# triton early (transformers' import does): the interpreter must be asked for in the
# environment the process starts with, e.g.
#   TRITON_INTERPRET=1 PYTHONPATH=/path/to/triton:. python -m pytest tests/test_fused.py
pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ATOL = RTOL = 1e-5


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the tiny shapes: several programs, loop trips and splits (the
    attention's too: never in one split)."""
    for name, value in (("QKV_BLOCK_C", 2), ("BLOCK_K", 16), ("DOWN_BLOCK_K", 16),
                        ("ATTN_BLOCK_S", 4), ("UP_BLOCK_N", 16), ("OUT_BLOCK_N", 8),
                        ("ATTN_ONE_SPLIT", 0)):
        monkeypatch.setattr(fused, name, value)


def layer(d=48, heads=4, kv_heads=2, hd=8, inter=80, qkv_bias=True, o_bias=False, seed=0):
    """One layer's weights in ``fast.Engine._layer``'s order, random, float32."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    rows = (heads + 2 * kv_heads) * hd
    return (1 + r(d), r(rows, d), r(rows) if qkv_bias else None, None, None,
            r(d, heads * hd), r(d) if o_bias else None, 1 + r(d), r(2 * inter, d), r(d, inter))


def rotary(pos: torch.Tensor, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[:, None].float() * inv[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


def gemv_blocks(monkeypatch, on: int) -> None:
    """The one-row tiles on (``on`` 1: reductions unrolled; 2: looped), smaller than the tiny
    shapes: several programs and blocks, a last block partly masked."""
    for name, value in (("GEMV", on), ("GEMV_UNROLL", 4 if on == 1 else 0),
                        ("GEMV_QKV_BLOCK_C", 1), ("GEMV_UP_BLOCK_N", 4),
                        ("GEMV_OUT_BLOCK_N", 2), ("GEMV_BLOCK_K", 32), ("GEMV_DOWN_BLOCK_K", 32)):
        monkeypatch.setattr(fused, name, value)


@pytest.mark.parametrize("n,start,bias,gemv", [(1, 0, True, 0), (1, 3, True, 1),
                                               (1, 7, False, 1), (1, 5, True, 2),
                                               (5, 11, False, 1), (16, 24, True, 0)])
def test_qkv_kernel(interpret, small_blocks, monkeypatch, n, start, bias, gemv):
    gemv_blocks(monkeypatch, gemv)
    heads, kvh, hd, length = 4, 2, 8, 40
    w = layer(qkv_bias=bias)
    x = torch.randn(n, 48, generator=torch.Generator().manual_seed(n))
    pos = start + torch.arange(n)
    cos, sin = rotary(pos, hd)
    want = fast._qkv(x, cos, sin, w, heads, kvh, 1e-6)
    got = fused.rms_qkv_rope(x, cos, sin, w, heads, kvh, 1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    kc, vc = torch.randn(2, kvh, length, hd).unbind(0)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref.index_copy_(1, pos, want[1])
    vc_ref.index_copy_(1, pos, want[2])
    q, k, v = fused.rms_qkv_rope(x, cos, sin, w, heads, kvh, 1e-6, cache=(kc, vc, pos))
    torch.testing.assert_close(q, want[0], atol=ATOL, rtol=RTOL)
    assert k is None and v is None
    torch.testing.assert_close(kc, kc_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(vc, vc_ref, atol=ATOL, rtol=RTOL)
    others = torch.ones(length, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(kc[:, others], kc_ref[:, others])  # no other slot written
    # the rotary tables read at the cache slots: no gather before the kernel
    cos_t, sin_t = rotary(torch.arange(length), hd)
    kc2, vc2 = kc.clone(), vc.clone()
    q2, _, _ = fused.rms_qkv_rope(x, cos_t, sin_t, w, heads, kvh, 1e-6, cache=(kc2, vc2, pos),
                                  rope_table=True)
    torch.testing.assert_close(q2, want[0], atol=ATOL, rtol=RTOL)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)
    with pytest.raises(ValueError, match="cache"):
        fused.rms_qkv_rope(x, cos_t, sin_t, w, heads, kvh, 1e-6, rope_table=True)


@pytest.mark.parametrize("n,d,dtype", [(1, 48, torch.float32), (5, 64, torch.float32),
                                       (16, 40, torch.float32), (3, 48, torch.float16)])
def test_final_norm_kernel(interpret, n, d, dtype):
    """``fused.rms_norm`` is ``fast._rms`` (float32 statistics, rounded to the dtype before
    the weights), rows of a width that is not a power of two too."""
    g = torch.Generator().manual_seed(n + d)
    x = (torch.randn(n, d, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    want = fast._rms(x, w, 1e-6)
    got = fused.rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == (n, d)
    tol = ATOL if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("n,start,blocks,o_bias", [
    (1, 0, "small", False), (1, 39, "default", True), (5, 9, "small", False),
    (16, 24, "small", True), (4, 30, "default", False), (1, 17, "gemv", True),
    (1, 21, "gemv-loop", False), (1, 39, "gemv-default", False), (3, 20, "gemv", True)])
def test_attention_mlp_kernels(interpret, monkeypatch, n, start, blocks, o_bias):
    """Attention over a cache of 40 slots whose slots beyond each query are stale (random),
    masked by positions and by the reference's bias, then o_proj, the MLP, residuals; one row
    on the one-row tiles too (small and default blocks; more rows then keep tl.dot's). Small
    blocks split the attention; the default attends these 40 slots in one split."""
    if blocks in ("gemv", "gemv-loop"):
        gemv_blocks(monkeypatch, 1 if blocks == "gemv" else 2)
    monkeypatch.setattr(fused, "GEMV", int(blocks.startswith("gemv")))
    if blocks == "small":
        monkeypatch.setattr(fused, "ATTN_BLOCK_S", 4)
        monkeypatch.setattr(fused, "ATTN_ONE_SPLIT", 0)
        for name, value in (("BLOCK_K", 16), ("DOWN_BLOCK_K", 32), ("OUT_BLOCK_N", 8)):
            monkeypatch.setattr(fused, name, value)
    check_attention_mlp(n, start, 100 + n, o_bias)


@pytest.mark.parametrize("n,gemv", [(1, 1), (1, 2), (5, 1)])
def test_every_block_hoisted(interpret, small_blocks, monkeypatch, n, gemv):
    """HOIST = 2 (every weight block of an unrolled one-row reduction loaded before the
    activations, as PDL wants them: before its wait): the layer still agrees with the
    reference, one row unrolled and looped (where only the first block is hoisted) and a
    few rows on tl.dot's tiles."""
    gemv_blocks(monkeypatch, gemv)
    monkeypatch.setattr(fused, "HOIST", 2)
    heads, kvh, hd = 4, 2, 8
    w = layer(qkv_bias=True)
    x = torch.randn(n, 48, generator=torch.Generator().manual_seed(40 + n))
    cos, sin = rotary(30 + torch.arange(n), hd)
    for a, b in zip(fused.rms_qkv_rope(x, cos, sin, w, heads, kvh, 1e-6),
                    fast._qkv(x, cos, sin, w, heads, kvh, 1e-6)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    check_attention_mlp(n, 30, 60 + n, o_bias=True)


def check_attention_mlp(n: int, start: int, seed: int, o_bias: bool = False, heads: int = 4
                        ) -> None:
    """``fused.attention_mlp`` against the reference for n rows at positions start.., over a
    cache of 40 slots (stale random values beyond each query's position), masked by
    positions and by the reference's bias; ``heads`` query heads over 2 kv heads."""
    kvh, hd, length, d = 2, 8, 40, 48
    w = layer(heads=heads, o_bias=o_bias)
    g = torch.Generator().manual_seed(seed)
    x, q = torch.randn(n, d, generator=g), torch.randn(heads, n, hd, generator=g)
    kc, vc = torch.randn(2, kvh, length, hd, generator=g).unbind(0)
    pos = start + torch.arange(n)
    bias = fused.visibility_bias(pos, length, heads // kvh, torch.float32)
    want = fast._rest(x, q, kc, vc, bias, w, hd ** -0.5, 1e-6)
    got = fused.attention_mlp(x, q, kc, vc, None, w, hd ** -0.5, 1e-6, pos=pos)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    got = fused.attention_mlp(x, q, kc, vc, bias, w, hd ** -0.5, 1e-6)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("one,n,start", [(0, 1, 21), (16, 1, 21), (22, 1, 21), (39, 1, 37),
                                         (40, 1, 39), (24, 3, 19), (8, 2, 30)])
def test_attention_in_one_split(interpret, monkeypatch, one, n, start):
    """ATTN_ONE_SPLIT: up to that many visible slots split 0 alone attends them all and writes
    the output itself (no partials, no counter); beyond, the splits combine as before (22
    visible over 16, 39 over 39 with the bias's 40 over it, 32 over 8); masked by positions
    and by the bias, against the reference; the counters left zero."""
    monkeypatch.setattr(fused, "ATTN_BLOCK_S", 4)
    monkeypatch.setattr(fused, "ATTN_ONE_SPLIT", one)
    monkeypatch.setattr(fused, "GEMV", 0)
    check_attention_mlp(n, start, 300 + start)
    assert not fused.counters(torch.device("cpu"), 1).any()


@pytest.mark.parametrize("rows,n,start,one", [(1, 3, 20, 0), (2, 1, 30, 0), (4, 2, 19, 0),
                                          (4, 5, 33, 0), (5, 2, 30, 40), (2, 5, 21, 40),
                                          (16, 5, 30, 0)])
def test_attention_heads_in_chunks(interpret, monkeypatch, rows, n, start, one):
    """ATTN_ROWS: a kv head's 3 query heads shared out over programs of at most ``rows``
    query rows (at least one head each: 3 programs of 1 head, or 2 of 2 and 1, or one
    program under 16 rows), split over the slots (each chunk's own counter) and in one
    split; masked by positions and by the bias, against the reference; counters left 0."""
    monkeypatch.setattr(fused, "ATTN_BLOCK_S", 4)
    monkeypatch.setattr(fused, "ATTN_ONE_SPLIT", one)
    monkeypatch.setattr(fused, "ATTN_ROWS", rows)
    monkeypatch.setattr(fused, "GEMV", 0)
    check_attention_mlp(n, start, 500 + start, heads=6)
    assert not fused.counters(torch.device("cpu"), 1).any()


def test_attention_head_chunks_arithmetic(monkeypatch):
    """How many query heads an attention program takes under ATTN_ROWS."""
    monkeypatch.setattr(fused, "ATTN_ROWS", 0)
    assert fused._heads_per_program(6, 6) == 6                  # off: one program a kv head
    monkeypatch.setattr(fused, "ATTN_ROWS", 16)
    assert fused._heads_per_program(6, 1) == 6                  # 6 rows fit
    assert fused._heads_per_program(7, 2) == 7                  # 14 rows fit
    assert fused._heads_per_program(6, 6) == 2                  # 36 rows: 3 programs of 12
    assert fused._heads_per_program(7, 6) == 2                  # 42: 4 programs (the last 6)
    assert fused._heads_per_program(6, 16) == 1                 # a head a program at least


SPLIT_NAMES = ("QKV_SPLIT_K", "OUT_SPLIT_K", "UP_SPLIT_K", "DOWN_SPLIT_K")


@pytest.mark.parametrize("splits,hoist,early", [
    ((1, 1, 1, 1), 1, 0), ((2, 3, 2, 3), 1, 0), ((0, 0, 0, 0), 1, 0), ((1, 1, 1, 1), 0, 0),
    ((2, 3, 2, 3), 0, 0), ((2, 3, 2, 3), 1, 8), ((0, 0, 0, 0), 1, 8), ((1, 1, 1, 1), 0, 8),
    ((2, 3, 2, 3), 1, 2)])
def test_split_k(interpret, small_blocks, monkeypatch, splits, hoist, early):
    """Every projection unsplit, split unevenly (the last split shorter: 3 reduction blocks
    in 2, 5 in 3; o_proj's 2 blocks asked in 3 get 2) and split as finely as auto goes (one
    block a split), with the first weight block hoisted and not, and each split's whole
    share loaded first where it has at most SPLIT_EARLY blocks (8: every split; 2: some):
    the layer still agrees with the reference, and the tile counters are left zero."""
    monkeypatch.setattr(fused, "HOIST", hoist)
    monkeypatch.setattr(fused, "SPLIT_EARLY", early)
    for name, value in zip(SPLIT_NAMES, splits):
        monkeypatch.setattr(fused, name, value)
    check_layer(3)


@pytest.mark.parametrize("n,gemv,splits,hoist,early", [
    (3, 0, (2, 3, 2, 3), 1, 0), (3, 0, (1, 1, 1, 1), 0, 0), (3, 0, (0, 0, 0, 0), 1, 2),
    (1, 0, (2, 3, 2, 3), 1, 0)])
def test_norm_weights_read_ahead(interpret, small_blocks, monkeypatch, n, gemv, splits, hoist,
                                 early):
    """LN_AHEAD: q/k/v's and gate/up's looped few-row reductions read each block's RMSNorm
    weights a block ahead: a few rows split unevenly, unsplit (no block hoisted: the loop
    starts at the first) and split finely with SPLIT_EARLY (some loops empty); one row on
    the few-row kernels (GEMV = 0). The layer still agrees with the reference."""
    monkeypatch.setattr(fused, "LN_AHEAD", 1)
    monkeypatch.setattr(fused, "HOIST", hoist)
    monkeypatch.setattr(fused, "SPLIT_EARLY", early)
    gemv_blocks(monkeypatch, gemv)
    for name, value in zip(SPLIT_NAMES, splits):
        monkeypatch.setattr(fused, name, value)
    check_layer(n)


@pytest.mark.parametrize("n,splits,hoist,ahead", [
    (2, (1, 1, 1, 1), 1, 0), (5, (2, 3, 2, 3), 1, 1), (16, (0, 0, 0, 0), 0, 0),
    (3, (2, 3, 2, 3), 2, 1), (1, (2, 3, 2, 3), 1, 1)])
def test_weight_columns_on_m(interpret, small_blocks, monkeypatch, n, splits, hoist, ahead):
    """SWAP: the few-row projections put the weight's columns on tl.dot's M side and the rows
    on N (the accumulator transposed until the epilogue): a few rows unsplit, split unevenly
    and as finely as auto goes, every block hoisted, the RMSNorm weights a block ahead, and
    one row on the few-row kernels (GEMV = 0). The layer still agrees with the reference."""
    monkeypatch.setattr(fused, "SWAP", 1)
    monkeypatch.setattr(fused, "GEMV", 0)
    monkeypatch.setattr(fused, "HOIST", hoist)
    monkeypatch.setattr(fused, "LN_AHEAD", ahead)
    for name, value in zip(SPLIT_NAMES, splits):
        monkeypatch.setattr(fused, name, value)
    check_layer(n)


def test_weight_columns_on_m_for_few_rows_only(monkeypatch):
    """SWAP reaches the few-row launches of every projection, not the one-row tiles'."""
    monkeypatch.setattr(fused, "SWAP", 1)
    monkeypatch.setattr(fused, "GEMV", 1)
    assert fused._swap(gemv=False) and not fused._swap(gemv=True)
    monkeypatch.setattr(fused, "SWAP", 0)
    assert not fused._swap(gemv=False)


def test_norm_weights_ahead_for_few_rows_only(monkeypatch):
    """LN_AHEAD reaches the few-row launches of q/k/v and gate/up, not the one-row tiles'
    (a 7B's looped one-row step measured slower with it), as the launches are recorded."""
    import fused_compile

    monkeypatch.setattr(fused, "_kernels", fused._kernels)  # record() replaces both
    monkeypatch.setattr(fused, "_hopper", fused._hopper)
    monkeypatch.setattr(fused, "_COUNTERS", {})  # the recording's meta-device counters go
    monkeypatch.setattr(fused, "LN_AHEAD", 1)
    monkeypatch.setattr(fused, "GEMV", 1)
    cases = [(256, 4, 2, 64, 512, torch.bfloat16, n) for n in (1, 5)]
    got = {(case[-1], fn.__name__): consts["LN_AHEAD"]
           for fn, _, consts, _, case in fused_compile.record(cases, twins=False)
           if "LN_AHEAD" in consts}
    assert got == {(1, "rms_qkv_rope"): False, (1, "rms_gate_up"): False,
                   (5, "rms_qkv_rope"): True, (5, "rms_gate_up"): True}


def check_layer(n: int) -> None:
    """A tiny layer over n rows at positions 20.. through ``fused.rms_qkv_rope`` (k and v
    into the cache) and ``fused.attention_mlp`` (masked by positions) against the reference
    halves, float32; the split-K tile counters are left zero."""
    heads, kvh, hd, length, d = 4, 2, 8, 40, 48
    w = layer(o_bias=True)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g)
    pos = 20 + torch.arange(n)
    cos, sin = rotary(pos, hd)
    kc, vc = torch.randn(2, kvh, length, hd, generator=g).unbind(0)
    want = fast._qkv(x, cos, sin, w, heads, kvh, 1e-6)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref.index_copy_(1, pos, want[1])
    vc_ref.index_copy_(1, pos, want[2])
    q, _, _ = fused.rms_qkv_rope(x, cos, sin, w, heads, kvh, 1e-6, cache=(kc, vc, pos))
    torch.testing.assert_close(q, want[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(kc, kc_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(vc, vc_ref, atol=ATOL, rtol=RTOL)
    bias = fused.visibility_bias(pos, length, heads // kvh, torch.float32)
    got = fused.attention_mlp(x, q, kc, vc, None, w, hd ** -0.5, 1e-6, pos=pos)
    torch.testing.assert_close(got, fast._rest(x, q, kc, vc, bias, w, hd ** -0.5, 1e-6),
                               atol=ATOL, rtol=RTOL)
    assert not fused.counters(x.device, 1).any()


def test_one_row_tiles_take_one_row(monkeypatch):
    """GEMV: one row takes the one-row tiles (BLOCK_M = 1, reductions of up to GEMV_UNROLL
    blocks unrolled); more rows, and one row with GEMV off, pad to tl.dot's 16 or more."""
    monkeypatch.setattr(fused, "GEMV", 1)
    monkeypatch.setattr(fused, "GEMV_UNROLL", 8)
    assert fused._gemv(1) and not any(fused._gemv(n) for n in (2, 6, 16))
    assert [fused._block_m(fused._gemv(n), n) for n in (1, 2, 6, 16)] == [1, 16, 16, 16]
    assert fused._unroll(True, 8) and not fused._unroll(True, 9)
    assert not fused._unroll(False, 1)
    monkeypatch.setattr(fused, "GEMV", 0)
    assert not fused._gemv(1) and fused._block_m(fused._gemv(1), 1) == 16


def test_split_k_arithmetic(monkeypatch):
    """(splits, blocks a split): none empty, none beyond the blocks, auto aims at
    PROGRAMS_PER_SM programs an SM."""
    cpu = torch.device("cpu")
    assert fused.split_k(10, 7, 2, cpu) == (2, 4)
    assert fused.split_k(10, 7, 3, cpu) == (3, 3)
    assert fused.split_k(10, 7, 5, cpu) == (4, 2)    # 5 splits of 2 would leave one empty
    assert fused.split_k(10, 7, 99, cpu) == (7, 1)
    assert fused.split_k(10, 1, 4, cpu) == (1, 1)
    monkeypatch.setattr(fused, "PROGRAMS_PER_SM", 2)
    assert fused.split_k(56, 19, 0, cpu) == (5, 4)    # 264 programs wanted: 5 splits
    assert fused.split_k(600, 19, 0, cpu) == (1, 19)


def test_attention_block_fits_its_tile(monkeypatch):
    """The slots an attention block walks: ATTN_BLOCK_S where rows x head dim x slots fits
    ATTN_TILE, else halved until it does (not below 16); the shipped shapes (0.5B, 1.5B) keep
    the measured 64, the 7B's 5-row verify (64 rows of 128) takes 32."""
    assert fused._attn_block_s(fused._rows(7 * 5), 64) == 64     # 0.5B verify
    assert fused._attn_block_s(fused._rows(6 * 5), 128) == 64    # 1.5B verify
    assert fused._attn_block_s(fused._rows(7 * 1), 128) == 64    # 7B decode
    assert fused._attn_block_s(fused._rows(7 * 5), 128) == 32    # 7B verify
    monkeypatch.setattr(fused, "ATTN_TILE", 1)
    assert fused._attn_block_s(16, 64) == 16                     # never below 16
    monkeypatch.setattr(fused, "ATTN_BLOCK_S", 4)
    assert fused._attn_block_s(16, 64) == 4                      # nor above what was asked


def test_settings(monkeypatch):
    """Settings given as NAME=VALUE reach the module (MAX_REGS the launches' register cap,
    GEMV_MAX_REGS the one-row launches' of hidden sizes of GEMV_CAP_BLOCKS..GEMV_UNROLL
    blocks, MAX_REGS where 0 or elsewhere; PDL only on a Hopper GPU, uninterpreted, for
    models whose one-row reductions unroll; HOIST = 2 only where PDL is set and the one-row
    launch is uncapped); bad ones are refused with the accepted names, tile and warp sizes
    that are no power of two (the W8_ tiles 0 too) before triton sees them."""
    for name in ("NUM_WARPS", "HOIST", "MAX_REGS", "GEMV_MAX_REGS", "PDL", "W8_GEMV_BLOCK_K",
                 "HEAD_BLOCK_N", "ATTN_TILE"):
        monkeypatch.setattr(fused, name, getattr(fused, name))  # restored after the test
    cpu = torch.device("cpu")
    assert "maxnreg" not in fused._launch(cpu)                   # 0: the compiler's choice
    # one-row launches: capped where the hidden size unrolls into 6..8 blocks of 256 (1.5B)
    assert [fused._launch(cpu, True, d).get("maxnreg") for d in (896, 1536, 2048, 3584)] == [
        None, 96, 96, None]
    assert "maxnreg" not in fused._launch(cpu, False, 1536)      # not the few-row kernels
    monkeypatch.setattr(fused, "GEMV_CAP_ALL", 0)                 # 0: the gate/up alone
    assert [fused._launch(cpu, True, 1536, gate_up=g).get("maxnreg") for g in (True, False)
            ] == [96, None]
    monkeypatch.setattr(fused, "GEMV_CAP_ALL", 1)
    fused.configure(["NUM_WARPS=8", "HOIST=0", "MAX_REGS=128", "PDL=1"])
    assert (fused.NUM_WARPS, fused.HOIST, fused.PDL) == (8, 0, 1)
    assert fused._launch(cpu) == {"num_warps": 8, "num_stages": fused.NUM_STAGES, "PDL": 0,
                                  "maxnreg": 128}                  # no PDL off a GPU
    assert [fused._launch(cpu, True, d)["maxnreg"] for d in (896, 1536)] == [128, 96]
    fused.configure(["GEMV_MAX_REGS=0"])
    assert fused._launch(cpu, True, 1536)["maxnreg"] == 128       # 0: they take MAX_REGS
    monkeypatch.setattr(fused, "interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = torch.device("cuda", 0)
    # PDL for models whose one-row reductions unroll (0.5B, 1.5B), not a 7B's (14 blocks)
    assert [fused._launch(gpu, True, d)["PDL"] for d in (896, 1536, 2048, 3584)] == [
        1, 1, 1, 0]
    assert fused._launch(gpu, False, 896)["launch_pdl"] is True   # few-row launches too
    assert "launch_pdl" not in fused._launch(gpu, True, 3584)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert fused._launch(gpu, True, 896)["PDL"] == 0 and "launch_pdl" not in fused._launch(
        gpu, True, 896)
    # every block early (HOIST = 2) only with PDL set and uncapped one-row launches (0.5B)
    monkeypatch.setattr(fused, "HOIST", 2)
    assert [fused._hoist(d) for d in (896, 1536, 3584)] == [2, 2, 1]  # GEMV_MAX_REGS 0 still
    monkeypatch.setattr(fused, "GEMV_MAX_REGS", 96)
    assert [fused._hoist(d) for d in (896, 1536, 3584)] == [2, 1, 1]
    monkeypatch.setattr(fused, "GEMV_CAP_ALL", 0)                 # the 1.5B's uncapped launches
    assert [fused._hoist(1536, gate_up=g) for g in (False, True)] == [2, 1]
    monkeypatch.setattr(fused, "GEMV_CAP_ALL", 1)
    monkeypatch.setattr(fused, "PDL", 0)
    assert fused._hoist(896) == 1
    monkeypatch.setattr(fused, "HOIST", 0)
    assert fused._hoist(896) == 0
    for bad in ("WARPS=8", "HOIST=yes", "HOIST"):
        with pytest.raises(CospecError, match="NUM_WARPS"):
            fused.configure([bad])
    for bad in ("HEAD_BLOCK_N=6", "GEMV_BLOCK_K=0", "NUM_WARPS=-4", "W8_GEMV_BLOCK_K=3"):
        with pytest.raises(CospecError, match="power of two"):
            fused.configure([bad])
    fused.configure(["W8_GEMV_BLOCK_K=0", "HEAD_BLOCK_N=16", "ATTN_TILE=1000"])
    assert (fused.W8_GEMV_BLOCK_K, fused.HEAD_BLOCK_N, fused.ATTN_TILE) == (0, 16, 1000)


def test_counter_buffers_outlive_the_graphs_captured_on_them(monkeypatch):
    """A split-K counter buffer outgrown (an int8 lm_head's 18,992 tiles, say) or set aside by
    ``fresh_counters`` stays alive: the CUDA graphs captured on it read it at every replay
    and keep no tensor alive themselves, so freed it would be someone else's memory."""
    monkeypatch.setattr(fused, "_COUNTERS", {})
    monkeypatch.setattr(fused, "_RETIRED", [])
    cpu = torch.device("cpu")
    first = fused.counters(cpu, 10)
    assert len(first) == 4096 and not first.any() and fused.counters(cpu, 4096) is first
    handed = weakref.ref(first)
    del first
    bigger = fused.counters(cpu, 18992)
    assert len(bigger) == 18992 and fused.counters(cpu, 100) is bigger
    gc.collect()
    assert handed() is not None                       # outgrown, not freed
    fused.fresh_counters(cpu)
    fresh = fused.counters(cpu, 10)
    assert fresh is not bigger and len(fresh) == 4096
    set_aside = weakref.ref(bigger)
    del bigger
    gc.collect()
    assert set_aside() is not None                    # set aside, not freed


def test_drop_in_functions_fall_back(interpret):
    """More than MAX_ROWS rows go to the reference, cache writes and position masks
    included; 2-d calls of few rows are fused and agree with it."""
    calls = []
    ref = (False, False, fast._qkv, fast._rest)
    _, _, qkv, rest = fused.fused_layer_functions(ref)
    w = layer()
    fused_rest = fused.attention_mlp
    for n in (fused.MAX_ROWS + 1, 3):
        x = torch.randn(n, 48)
        pos = 2 + torch.arange(n)
        cos, sin = rotary(pos, 8)
        kc, vc = torch.zeros(2, 2, 32, 8).unbind(0)
        q, k, v = qkv(x, cos, sin, w, 4, 2, 1e-6, cache=(kc, vc, pos))
        want = fast._qkv(x, cos, sin, w, 4, 2, 1e-6)
        torch.testing.assert_close(q, want[0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(kc[:, pos], want[1], atol=ATOL, rtol=RTOL)
        assert k is None and float(kc[:, :2].abs().sum()) == 0.0
        bias = fused.visibility_bias(pos, 32, 2, torch.float32)
        fused.attention_mlp = lambda *a, n=n, **k: calls.append(n) or fused_rest(*a, **k)
        try:
            got = rest(x, q, kc, vc, None, w, 8 ** -0.5, 1e-6, pos=pos)
        finally:
            fused.attention_mlp = fused_rest
        torch.testing.assert_close(got, fast._rest(x, q, kc, vc, bias, w, 8 ** -0.5, 1e-6),
                                   atol=ATOL, rtol=RTOL)
    assert calls == [3]


@pytest.fixture
def models(monkeypatch):
    """A tiny float32 Qwen2 target (2 layers, 4 heads over 2 kv heads, head_dim 8) and a
    1-layer draft, fresh (no engines pooled by other tests). Two attention splits: the
    interpreter's time grows with splits x heads; the kernel tests cover the default."""
    monkeypatch.setattr(fused, "SPLITS", 2)
    return tiny_model(11, dtype=torch.float32), tiny_model(12, layers=1, dtype=torch.float32)


def guard_reference(monkeypatch, norm: bool = False):
    """Fail if a forward of <= MAX_ROWS tokens reaches the reference layer (``norm``: or
    torch's RMSNorm, the final norm's too)."""
    def only_long(reference):
        def call(x, *args):
            assert x.shape[-2] > fused.MAX_ROWS, "a short forward left the fused path"
            return reference(x, *args)
        return call

    for name in ("_qkv", "_rms") if norm else ("_qkv",):
        monkeypatch.setattr(fast, name, only_long(getattr(fast, name)))


@pytest.mark.parametrize("gemv,edges", [(0, 1), (1, 1), (1, 0)])
def test_model_logits_match_transformers(interpret, monkeypatch, models, gemv, edges):
    """Prefill of 12 tokens (fused) or 20 (reference), then 5-token verifies with 2 rows
    rolled back and 1-token steps (with and without the one-row tiles): the fused engine's
    logits are transformers' to 1e-5; with the step's edges fused (EDGES: the final norm in
    one kernel, RoPE from the rotary tables) no short forward calls torch's RMSNorm."""
    monkeypatch.setattr(fused, "GEMV", gemv)
    monkeypatch.setattr(fused, "EDGES", edges)
    guard_reference(monkeypatch, norm=bool(edges))
    model = models[0]
    ids = torch.randint(2, 96, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    for start in (12, 20):
        monkeypatch.setenv("COSPEC_FUSED", "1")
        lm, ref = fast.StaticLM(model, max_len=64), CachedLM(model)
        assert lm.engine.fused
        rows = 0
        with torch.inference_mode():
            for a, b in fast.side_by_side(lm, ref, ids, start=start, steps=4, verify=5,
                                          reject=2, every=2):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
                rows += len(a)
        assert rows == 12 and lm.length == ref.length == start + 8


def test_greedy_tokens_identical(interpret, monkeypatch, models):
    """Target-only and speculative greedy decoding through the fused engines (the one-row
    tiles on) give the plain (transformers, DynamicCache) decoding's tokens."""
    monkeypatch.setattr(fused, "GEMV", 1)
    want, got = plain_and_fused_tokens(monkeypatch, *models, guard=True)
    assert got == want and len(got[0]) == 6
    assert all(e.fused for m in models for e in fast.engines(m))


def plain_and_fused_tokens(monkeypatch, target, draft, guard: bool = False):
    """(plain, fused): the tokens of target-only and speculative (k = 3) greedy decoding of
    6 tokens, plain (transformers, DynamicCache) then through the fused static engines
    (``guard``: no short forward may reach the reference layer)."""
    ids = [5, 17, 33, 2, 60, 41]

    def run(proposer, k):
        return [t.id for t in generate(target, proposer, ids, ExactRule(), k=k,
                                       max_new_tokens=6)]

    monkeypatch.setenv("COSPEC_EAGER", "1")
    want = run(None, 1), run(draft, 3)
    monkeypatch.delenv("COSPEC_EAGER")
    monkeypatch.setenv("COSPEC_STATIC", "1")
    monkeypatch.setenv("COSPEC_FUSED", "1")
    if guard:
        guard_reference(monkeypatch)
    return want, (run(None, 1), run(draft, 3))


def test_modes(interpret, monkeypatch, models):
    """COSPEC_FUSED: auto (unset) fuses on the GPUs where the kernels measured faster and keeps
    the reference elsewhere, silently (also for a model they cannot run), with greedy
    speculative tokens equal to plain decoding's; 0 never fuses; 1 fuses wherever it can and
    warns where it cannot; any other value is refused by name."""
    target, draft = models
    ids = [5, 17, 33, 2, 60, 41]

    def run():
        return [t.id for t in generate(target, draft, ids, ExactRule(), k=3, max_new_tokens=6)]

    monkeypatch.setenv("COSPEC_EAGER", "1")
    want = run()
    monkeypatch.delenv("COSPEC_EAGER")
    monkeypatch.setenv("COSPEC_STATIC", "1")
    monkeypatch.delenv("COSPEC_FUSED", raising=False)
    assert not fast.Engine(draft, 32).fused                 # CPU: not a measured GPU
    monkeypatch.setattr(fused, "measured_faster", lambda device: True)
    assert run() == want and len(want) == 6
    for model in models:
        assert fast.engines(model) and all(e.fused for e in fast.engines(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # auto: no warning
        assert not fast.Engine(tiny_model(13), 32).fused     # float64: not taken
    monkeypatch.setenv("COSPEC_FUSED", "0")
    assert not fast.Engine(draft, 32).fused
    monkeypatch.setenv("COSPEC_FUSED", "1")
    monkeypatch.setattr(fused, "measured_faster", lambda device: False)
    assert fast.Engine(draft, 32).fused
    with pytest.warns(UserWarning, match="dtype torch.float64"):
        assert not fast.Engine(tiny_model(13), 32).fused
    monkeypatch.setenv("COSPEC_FUSED", "small")
    with pytest.raises(CospecError, match="COSPEC_FUSED='small'"):
        fast.Engine(draft, 32)


def test_unsupported_keeps_the_reference(interpret, monkeypatch):
    """A float64 model (and no triton at all) keeps the reference path, with a warning."""
    model = tiny_model(13)  # float64
    with pytest.warns(UserWarning, match="dtype torch.float64"):
        eng = fast.Engine(model, 32, fused=True)
    assert not eng.fused and eng.qkv is fast._qkv
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fast.Engine(model, 32).fused  # not asked: no check, no warning
    model = tiny_model(13, dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fused.unsupported(fast.Engine(model, 32)).startswith("cpu tensors need")
    monkeypatch.setattr(fused, "_has_triton", lambda: False)
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert not fast.Engine(model, 32, fused=True).fused


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and compiled triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hoist,gemv,one,pdl,ahead,rows,swap", [
    (0, 0, 0, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0), (1, 1, 64, 0, 0, 0, 0),
    (1, 0, 0, 1, 0, 0, 0), (2, 1, 0, 1, 0, 0, 0), (2, 1, 64, 2, 0, 0, 0), (0, 0, 0, 0, 1, 0, 0),
    (1, 1, 0, 1, 1, 0, 0), (1, 1, 0, 1, 0, 4, 0), (2, 1, 64, 1, 0, 4, 0), (1, 0, 0, 0, 0, 0, 1),
    (2, 1, 64, 1, 1, 4, 1), (1, 1, 0, 1, 1, 0, 64)])
def test_cuda_graphs(monkeypatch, dtype, hoist, gemv, one, pdl, ahead, rows, swap):
    """On a GPU: compiled kernels inside captured CUDA graphs; float32 to 1e-4 against
    transformers, bfloat16 argmax-equal on most rows; split-K deterministic, its counters
    left zero; with and without the first weight block hoisted (every block: 2), one-row
    steps on the one-row tiles, the attention in one split up to 64 slots and split beyond
    (ATTN_ONE_SPLIT), each kernel launched to start before the previous one ends (PDL,
    on a Hopper GPU), the looped reductions' RMSNorm weights read a block ahead
    (LN_AHEAD), and a kv head's query heads shared out over attention programs of at most
    4 rows (ATTN_ROWS: the verify's 2 heads x 6 rows in 2 programs), and the few-row
    projections with the weight's columns on tl.dot's M side (SWAP; 64: on 64-column tiles,
    wide enough for Hopper's wgmma)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "SWAP", int(bool(swap)))
    if swap > 1:
        for name in ("UP_BLOCK_N", "OUT_BLOCK_N"):
            monkeypatch.setattr(fused, name, swap)
    monkeypatch.setattr(fused, "HOIST", hoist)
    monkeypatch.setattr(fused, "LN_AHEAD", ahead)
    monkeypatch.setattr(fused, "PDL", pdl)
    monkeypatch.setattr(fused, "GEMV", gemv)
    monkeypatch.setattr(fused, "ATTN_ONE_SPLIT", one)  # 64: one split a kv head to 64 slots
    monkeypatch.setattr(fused, "ATTN_ROWS", rows)
    model = tiny_model(14, width=128).to("cuda", dtype)  # head_dim 32
    ids = torch.randint(2, 96, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    monkeypatch.setenv("COSPEC_FUSED", "1")
    lm, ref = fast.StaticLM(model, max_len=128), CachedLM(model)
    assert cuda_agreement(lm, ref, ids, 24, dtype) >= 0.9
    assert lm.engine.fused and lm.engine.graphs
    assert not any(c.any() for d, c in fused._COUNTERS.items()  # split-K counters back to 0
                   if d.type == "cuda")
    again = [lm.engine.run([5, 6, 7], lm.length)[0].clone() for _ in range(2)]
    assert torch.equal(*again)  # partial sums added in split order: bit-identical replays
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert fused._launch(lm.device)["PDL"] == (pdl if hopper else 0)


def cuda_agreement(lm, ref, ids: list[int], start: int, dtype: torch.dtype) -> float:
    """The share of rows on which ``lm`` (a ``fast.StaticLM``) and ``ref`` pick the same
    argmax over ``fast.side_by_side``'s schedule from ``start`` (8 steps, every other one a
    6-token verify rolling 3 back); float32 logits must also agree to 1e-4."""
    agree = rows = 0
    with torch.inference_mode():
        for a, b in fast.side_by_side(lm, ref, ids, start=start, steps=8, verify=6, reject=3,
                                      every=2):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            rows += len(a)
    return agree / rows


def test_programs_resident_an_sm():
    """``fused_compile.py --usage``'s occupancy arithmetic (``resident``): registers (64 Ki
    an SM, a warp's taken in 256s), shared memory (227 KiB, 1 KiB reserved a program), at
    most 32 programs and 64 warps an SM."""
    import fused_compile

    assert fused_compile.resident(254, 20480, 4) == 2      # 254 x 32 x 4 = 32,512 registers
    assert fused_compile.resident(96, 12288, 4) == 5
    assert fused_compile.resident(100, 0, 4) == 4           # a warp's 3,200 taken as 3,328
    assert fused_compile.resident(32, 147968, 4) == 1      # shared memory bound
    assert fused_compile.resident(16, 0, 1) == 32           # the programs-an-SM cap
    assert fused_compile.resident(16, 0, 4) == 16           # the warps cap


@pytest.mark.skipif(INTERPRETED, reason="the compiled kernels' options (without TRITON_INTERPRET)")
def test_compile_hints_follow_the_launcher():
    """The offline compile gets the launcher's divisibility hints: every tensor, and integers
    divisible by 16 unless the kernel does not specialise on them (``n``). Without them the
    compiler loads 2-byte scalars and the registers it reports are not the running kernels'."""
    import fused_compile

    from cospec import kernels

    t = torch.empty(4, device="meta")
    got = fused_compile.hints(kernels.down_residual, [t] * 8 + [16, 4864, 250])
    assert sorted(got) == [(i,) for i in range(8)] + [(9,)]
    assert got[(9,)] == [["tt.divisibility", 16]]


def test_kernels_compile_for_sm90():
    """The launches of a 0.5B decode and verify step (also with int8 weights and lm_head)
    compile for an H100 / H200 with triton's own toolchain (no GPU needed; a separate
    process: this one's triton may be interpreted)."""
    root = str(Path(__file__).resolve().parent.parent)  # cospec importable, installed or not
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    script = Path(__file__).parent / "fused_compile.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], env=env, timeout=300,
                          capture_output=True, text=True)
    if done.returncode == 77:
        pytest.skip("triton without its NVIDIA backend")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "72 launches compiled" in done.stdout  # 2 steps x (3 ways x 10 + int8's 6)
