"""int8 weights in the fused layers (``fused.Int8``, ``fast.int8_weights``): the kernels
compute what the reference computes with the dequantized weights (q * s), to 1e-5 in float32.

As ``test_fused.py``, the kernel tests run under triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 in the environment at start). Each also checks that the result is *not*
the unquantized layer's: a kernel that read the original weights would fail.
"""

import copy
import warnings

import pytest
import torch
from test_fused import ATOL, INTERPRETED, RTOL, cuda_agreement, gemv_blocks, layer, rotary
from tiny import tiny_model

from cospec import fast, fused
from cospec.acceptance import ExactRule
from cospec.decoding import CachedLM, generate
from cospec.fast import PROJECTIONS


def int8_layer(w: tuple) -> tuple[tuple, tuple]:
    """(the layer's int8 copies as the engine keeps them, the layer with its projections
    replaced by what the copies stand for: the reference's weights)."""
    w8 = tuple(fused.quantize(w[i]) for i in PROJECTIONS)
    deq = list(w)
    for i, c in zip(PROJECTIONS, w8):
        deq[i] = fused.dequantized(c, w[i].dtype)
    return w8, tuple(deq)


def test_quantize_bounds():
    """One absmax scale a row, |w - q s| <= s / 2, values in [-127, 127], zero rows kept."""
    w = torch.randn(7, 40, generator=torch.Generator().manual_seed(0)) * 3
    w[3] = 0
    c = fused.quantize(w)
    assert c.q.dtype == torch.int8 and c.s.shape == (7,) and c.s.dtype == torch.float32
    assert int(c.q.abs().max()) == 127 and not c.q[3].any() and c.s[3] == 1
    assert torch.equal(c.s[[0, 1, 2, 4, 5, 6]], w[[0, 1, 2, 4, 5, 6]].abs().amax(1) / 127)
    err = (w - fused.dequantized(c, torch.float32)).abs()
    assert (err <= c.s[:, None] / 2 + 1e-6).all()


W8_TILES = (("W8_GEMV_BLOCK_K", 16), ("W8_GEMV_UP_BLOCK_N", 2), ("W8_GEMV_OUT_BLOCK_N", 4),
            ("W8_GEMV_DOWN_BLOCK_K", 64))


@pytest.mark.parametrize("n,gemv,small,own", [(1, 1, False, False), (1, 1, True, False),
                                              (1, 2, True, False), (1, 1, False, True),
                                              (5, 1, True, False), (3, 0, False, False)])
def test_layer_kernels(interpret, monkeypatch, n, gemv, small, own):
    """q/k/v (+ bias, RoPE, cache writes) and attention + o_proj + MLP over int8 copies: one
    row unrolled and looped on the one-row tiles (``own``: the int8 launches' own W8_GEMV_*
    tiles), a few rows on tl.dot's; small blocks split every reduction (split-K) and leave
    partial tiles."""
    gemv_blocks(monkeypatch, gemv)
    for name, value in W8_TILES if own else ():
        monkeypatch.setattr(fused, name, value)
    if small:
        for name, value in (("QKV_BLOCK_C", 2), ("BLOCK_K", 16), ("DOWN_BLOCK_K", 16),
                            ("UP_BLOCK_N", 16), ("OUT_BLOCK_N", 8), ("ATTN_ONE_SPLIT", 0)):
            monkeypatch.setattr(fused, name, value)
    heads, kvh, hd, length = 4, 2, 8, 40
    w = layer(qkv_bias=True, o_bias=True, seed=3)
    w8, deq = int8_layer(w)
    g = torch.Generator().manual_seed(n)
    x, q_in = torch.randn(n, 48, generator=g), torch.randn(heads, n, hd, generator=g)
    kc, vc = torch.randn(2, kvh, length, hd, generator=g).unbind(0)
    pos = 20 + torch.arange(n)
    cos, sin = rotary(pos, hd)
    got = fused.rms_qkv_rope(x, cos, sin, w, heads, kvh, 1e-6, w8=w8)
    want = fast._qkv(x, cos, sin, deq, heads, kvh, 1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got[0], fast._qkv(x, cos, sin, w, heads, kvh, 1e-6)[0],
                              atol=ATOL, rtol=RTOL)
    bias = fused.visibility_bias(pos, length, heads // kvh, torch.float32)
    got = fused.attention_mlp(x, q_in, kc, vc, None, w, hd ** -0.5, 1e-6, pos=pos, w8=w8)
    want = fast._rest(x, q_in, kc, vc, bias, deq, hd ** -0.5, 1e-6)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got, fast._rest(x, q_in, kc, vc, bias, w, hd ** -0.5, 1e-6),
                              atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("n,bias,block_n", [(1, False, 8), (1, True, 2), (4, True, 8)])
def test_logits(interpret, monkeypatch, n, bias, block_n):
    """The int8 lm_head: h @ (q s).T + b over a vocabulary that leaves the last tile partial
    (97 rows), one row on the one-row tiles (unrolled blocks of 32) and a few on tl.dot's."""
    monkeypatch.setattr(fused, "GEMV_BLOCK_K", 32)
    monkeypatch.setattr(fused, "HEAD_BLOCK_N", block_n)
    g = torch.Generator().manual_seed(7)
    head, h = torch.randn(97, 48, generator=g), torch.randn(n, 48, generator=g)
    b = torch.randn(97, generator=g) if bias else None
    c = fused.quantize(head)
    got = fused.logits(h, c, b)
    want = torch.nn.functional.linear(h, fused.dequantized(c, torch.float32), b)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got, torch.nn.functional.linear(h, head, b), atol=ATOL,
                              rtol=RTOL)


def test_int8_launches_take_their_own_tiles(monkeypatch):
    """W8_GEMV_* set the one-row tiles of the launches over int8 weights only (0: the bf16
    launches' GEMV_*), the lm_head's reduction blocks included; their register cap and HOIST
    follow their own block count."""
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return _Launcher(name, calls)

    monkeypatch.setattr(fused, "_kernels", Recorder)
    monkeypatch.setattr(fused, "_COUNTERS", {})  # its meta-device counters: not kept
    d, heads, kvh, hd, inter = 896, 14, 2, 64, 4864

    def t(*shape, dt=torch.bfloat16):
        return torch.empty(*shape, dtype=dt, device="meta")

    rows = (heads + 2 * kvh) * hd
    w = (t(d), t(rows, d), t(rows), None, None, t(d, heads * hd), None, t(d), t(2 * inter, d),
         t(d, inter))
    w8 = tuple(fused.Int8(t(*w[i].shape, dt=torch.int8), t(len(w[i]), dt=torch.float32))
               for i in PROJECTIONS)
    head8 = fused.Int8(t(151936, d, dt=torch.int8), t(151936, dt=torch.float32))

    def layer_launches(copies):
        calls.clear()
        x, pos, kc = t(1, d), t(1, dt=torch.int64), t(kvh, 64, hd)
        q, _, _ = fused.rms_qkv_rope(x, t(1, hd), t(1, hd), w, heads, kvh, 1e-6,
                                     cache=(kc, kc, pos), w8=copies)
        fused.attention_mlp(x, q, kc, kc, None, w, hd ** -0.5, 1e-6, pos=pos, w8=copies)
        if copies is not None:
            fused.logits(x, head8, None)
        return [(name, c["BLOCK_K"], c.get("BLOCK_N", c.get("BLOCK_C"))) for name, c in calls
                if name != "attend"]

    for name in ("W8_GEMV_BLOCK_K", "W8_GEMV_UP_BLOCK_N", "W8_GEMV_OUT_BLOCK_N",
                 "W8_GEMV_DOWN_BLOCK_K"):
        monkeypatch.setattr(fused, name, 0)  # 0: the bf16 launches' tiles
    f = fused  # the defaults (blocks within the 896 / 4864 reductions)
    bf16 = [("rms_qkv_rope", f.GEMV_BLOCK_K, f.GEMV_QKV_BLOCK_C),
            ("down_residual", f.GEMV_DOWN_BLOCK_K, f.GEMV_OUT_BLOCK_N),
            ("rms_gate_up", f.GEMV_BLOCK_K, f.GEMV_UP_BLOCK_N),
            ("down_residual", f.GEMV_DOWN_BLOCK_K, f.GEMV_OUT_BLOCK_N)]
    assert layer_launches(None) == bf16
    assert layer_launches(w8) == bf16 + [("down_residual", f.GEMV_BLOCK_K, f.HEAD_BLOCK_N)]
    for name, value in (("W8_GEMV_BLOCK_K", 512), ("W8_GEMV_UP_BLOCK_N", 4),
                        ("W8_GEMV_OUT_BLOCK_N", 2), ("W8_GEMV_DOWN_BLOCK_K", 2048)):
        monkeypatch.setattr(fused, name, value)
    assert layer_launches(None) == bf16
    assert layer_launches(w8) == [("rms_qkv_rope", 512, 2), ("down_residual", 1024, 2),
                                  ("rms_gate_up", 512, 4), ("down_residual", 2048, 2),
                                  ("down_residual", 512, f.HEAD_BLOCK_N)]
    assert fused._blocks(1536) == 6 and fused._blocks(1536, w8=True) == 3
    capped = fused._launch(torch.device("meta"), True, 1536, gate_up=True)
    assert capped.get("maxnreg") == fused.GEMV_MAX_REGS                # 6 blocks: capped
    assert "maxnreg" not in fused._launch(torch.device("meta"), True, 1536, gate_up=True,
                                          w8=True)                    # 3 blocks: not


class _Launcher:
    """Records a kernel's launch (its name and constexprs) instead of running it."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **consts: self.calls.append((self.name, consts))


def dequantized_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose linear layers (lm_head included) hold q * s of their int8
    rounding: the model an int8 engine of ``model`` computes. Rows are rounded one by one,
    so rounding q, k and v apart is rounding their stacked weight."""
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for m in deq.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(fused.dequantized(fused.quantize(m.weight), m.weight.dtype))
    return deq


def test_engine_logits(interpret, monkeypatch):
    """A marked model's fused engine (every forward <= 16 tokens: the fused path, prefill
    included) gives transformers' logits of the dequantized model to 1e-5, over decode steps
    and verifies with rollbacks; an unmarked engine of the same model does not."""
    monkeypatch.setattr(fused, "SPLITS", 2)
    monkeypatch.setattr(fused, "GEMV", 1)
    monkeypatch.setenv("COSPEC_FUSED", "1")
    model = tiny_model(21, dtype=torch.float32)
    plain = fast.Engine(model, 64)
    fast.int8_weights(model)
    lm = fast.StaticLM(model, max_len=64)
    assert lm.engine is not plain and lm.engine.head8 is not None
    assert len(lm.engine.layers8) == 2 and lm.engine.layers8[0][0].q.dtype == torch.int8
    ref = CachedLM(dequantized_model(model))
    ids = torch.randint(2, 96, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    rows = 0
    with torch.inference_mode():
        for a, b in fast.side_by_side(lm, ref, ids, start=10, steps=4, verify=5, reject=2,
                                      every=2):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
            rows += len(a)
        assert rows == 12
        first, _ = plain.run(ids[:10], 0)
    int8_first, _ = fast.Engine(model, 64).run(ids[:10], 0)
    assert not torch.allclose(first, int8_first, atol=ATOL, rtol=RTOL)


def test_int8_draft_keeps_greedy_exact(interpret, monkeypatch):
    """Speculative greedy decoding with an int8 draft gives plain greedy decoding's tokens
    (the draft's engines did read int8 copies)."""
    monkeypatch.setattr(fused, "SPLITS", 2)
    monkeypatch.setattr(fused, "GEMV", 1)
    target, draft = tiny_model(11, dtype=torch.float32), tiny_model(12, layers=1,
                                                                    dtype=torch.float32)
    ids = [5, 17, 33, 2, 60, 41]

    def run(proposer, k):
        return [t.id for t in generate(target, proposer, ids, ExactRule(), k=k,
                                       max_new_tokens=8)]

    monkeypatch.setenv("COSPEC_EAGER", "1")
    want = run(None, 1)
    monkeypatch.delenv("COSPEC_EAGER")
    monkeypatch.setenv("COSPEC_STATIC", "1")
    monkeypatch.setenv("COSPEC_FUSED", "1")
    fast.int8_weights(draft)
    assert run(draft, 3) == want and len(want) == 8
    assert all(e.layers8 is not None for e in fast.engines(draft))
    assert all(e.layers8 is None for e in fast.engines(target))


def test_unfused_engine_warns(monkeypatch):
    """A marked model whose engine runs the reference layers keeps its weights, and says so."""
    monkeypatch.setenv("COSPEC_FUSED", "0")
    model = tiny_model(22, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast.Engine(model, 32).layers8 is None          # not marked: silent
    fast.int8_weights(model)
    with pytest.warns(UserWarning, match="int8 weights are read by the fused layers only"):
        eng = fast.Engine(model, 32)
    assert eng.layers8 is None and eng.head8 is None


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and compiled triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hoist,pdl", [(1, 0), (2, 1)])
def test_cuda_graphs(monkeypatch, dtype, hoist, pdl):
    """On a GPU: the int8 engine's compiled kernels inside CUDA graphs (the one-row tiles,
    every weight block loaded early under PDL, or the first only) against transformers over
    the dequantized model: float32 to 1e-4, bfloat16 argmax-equal on 4 rows of 5 or more."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "HOIST", hoist)
    monkeypatch.setattr(fused, "PDL", pdl)
    monkeypatch.setenv("COSPEC_FUSED", "1")
    model = tiny_model(14, width=128).to("cuda", dtype)  # head_dim 32
    fast.int8_weights(model)
    lm, ref = fast.StaticLM(model, max_len=128), CachedLM(dequantized_model(model))
    ids = torch.randint(2, 96, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    # every forward <= 16 tokens. In bfloat16 the reference is not the kernels' function: it
    # reads q * s rounded to bfloat16, the kernels q and s apart (an H200: 24 of 28 rows
    # argmax-equal, with the first weight block hoisted or every one; broken kernels: ~0)
    assert cuda_agreement(lm, ref, ids, 12, dtype) >= (0.9 if dtype == torch.float32 else 0.8)
    assert lm.engine.layers8 is not None and lm.engine.graphs
