"""Triton kernels of one transformer layer over a few rows (``cospec.fused`` launches them).

Five kernels a layer, each reading its weights once for all n <= 16 rows (tl.dot over a block
of BLOCK_M >= 16 rows, the padding rows masked):

1. ``rms_qkv_rope``: RMSNorm, the stacked q/k/v projection (+ bias), RoPE on q and k; q to
   a buffer [H, n, hd], k and v straight into their cache slots (or [KVH, n, hd] buffers).
2. ``attend``: split-K decode attention (flash-decoding): program (kv head, split) scores
   the G = H / KVH query heads of its kv head, n rows each, over its share of the visible
   slots with an online softmax; partial sums (unnormalised output, max, denominator) go to
   [SPLITS, H, n] buffers.
3. ``attn_out``: the splits combined, o_proj (+ bias) and the residual add.
4. ``rms_gate_up``: RMSNorm, the stacked gate/up projection, SiLU(gate) * up.
5. ``down_residual``: down_proj and the residual add.

Rounding follows the torch reference (``cospec.fast._qkv`` / ``_rest``) where it is cheap:
a projection's output is rounded to the model's dtype before anything else uses it; the
softmax and the combination run in float32. Importing this module needs triton.
"""

# no "from __future__ import annotations": triton reads the tl.constexpr annotations
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; IEEE: exact float32 products (no TF32) for float32 operands."""
    if IEEE:  # noqa: SIM108 (a constexpr branch)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _rstd(x_ptr, n, d, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the rows of x [n, d], in float32 ([BLOCK_M])."""
    rows = tl.arange(0, BLOCK_M)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + rows[:, None] * d + ks[None, :],
                     mask=(rows[:, None] < n) & (ks[None, :] < d), other=0.0).to(tl.float32)
        ss += tl.sum(xv * xv, axis=1)
    return tl.rsqrt(ss / d + eps)


@triton.jit
def _normed(x_ptr, ln_ptr, rstd, k0, n, d, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0..k0+BLOCK_K of RMSNorm(x) as the reference rounds it: w * (x * rstd).to(dtype)."""
    rows = tl.arange(0, BLOCK_M)
    ks = k0 + tl.arange(0, BLOCK_K)
    xv = tl.load(x_ptr + rows[:, None] * d + ks[None, :],
                 mask=(rows[:, None] < n) & (ks[None, :] < d), other=0.0)
    w = tl.load(ln_ptr + ks, mask=ks < d, other=0.0)
    return (xv.to(tl.float32) * rstd[:, None]).to(xv.dtype) * w[None, :]


@triton.jit
def rms_qkv_rope(x_ptr, ln_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                 n, d, kv_len, eps,
                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (head j of the H + 2 KVH stacked heads, chunk c): output columns c*BLOCK_C..
    of both halves of head j (RoPE pairs column i with i + hd/2). x [n, d]; w [(H + 2 KVH)
    hd, d]; cos, sin [n, hd]; q [H, n, hd]; k, v [KVH, kv_len, hd], row i written to slot
    slot[i]."""
    head = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)      # in the first half
    w1 = head * HEAD_DIM + cols                                      # weight rows
    w2 = w1 + HALF
    rstd = _rstd(x_ptr, n, d, eps, BLOCK_M, BLOCK_K)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        h = _normed(x_ptr, ln_ptr, rstd, k0, n, d, BLOCK_M, BLOCK_K)
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks[:, None] < d
        wa = tl.load(w_ptr + w1[None, :] * d + ks[:, None], mask=km, other=0.0)
        wb = tl.load(w_ptr + w2[None, :] * d + ks[:, None], mask=km, other=0.0)
        acc1 = _dot(h, wa, acc1, IEEE)
        acc2 = _dot(h, wb, acc2, IEEE)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + w1).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + w2).to(tl.float32)[None, :]
    dtype = x_ptr.dtype.element_ty
    a1 = acc1.to(dtype).to(tl.float32)
    a2 = acc2.to(dtype).to(tl.float32)
    rm = rows[:, None] < n
    trig = rows[:, None] * HEAD_DIM + cols[None, :]
    c1 = tl.load(cos_ptr + trig, mask=rm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trig + HALF, mask=rm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig, mask=rm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + HALF, mask=rm, other=0.0).to(tl.float32)
    hv = head + rows[:, None] * 0                                    # head, as a [M, 1] block
    is_q = hv < HEADS
    is_v = hv >= HEADS + KV_HEADS
    r1 = tl.where(is_v, a1, a1 * c1 - a2 * s1).to(dtype)             # RoPE on q and k
    r2 = tl.where(is_v, a2, a2 * c2 + a1 * s2).to(dtype)
    qo = q_ptr + (head * n + rows[:, None]) * HEAD_DIM + cols[None, :]
    tl.store(qo, r1, mask=rm & is_q)
    tl.store(qo + HALF, r2, mask=rm & is_q)
    slots = tl.load(slot_ptr + rows, mask=rows < n, other=0)
    kvh = tl.where(is_q, 0, tl.where(is_v, hv - HEADS - KV_HEADS, hv - HEADS))
    off = (kvh * kv_len + slots[:, None]) * HEAD_DIM + cols[None, :]
    is_k = ~is_q & ~is_v
    tl.store(k_ptr + off, r1, mask=rm & is_k)
    tl.store(k_ptr + off + HALF, r2, mask=rm & is_k)
    tl.store(v_ptr + off, r1, mask=rm & is_v)
    tl.store(v_ptr + off + HALF, r2, mask=rm & is_v)


@triton.jit
def attend(q_ptr, k_ptr, v_ptr, pos_ptr, bias_ptr, o_ptr, m_ptr, l_ptr,
           n, cache_len, scale,
           HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
           SPLITS: tl.constexpr, USE_POS: tl.constexpr, IEEE: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (kv head g, split s). q [H, n, hd] (rows r = j*n + i of kv head g are query
    head g*G + j, token i); k, v [KVH, cache_len, hd]. USE_POS: token i sees slots <=
    pos[i], and the slots 0..pos[n-1] are shared out over the splits; otherwise every slot,
    with the additive bias [G*n, cache_len]. Writes the split's unnormalised output
    o [SPLITS, H, n, hd], running max m and denominator l [SPLITS, H, n] (float32)."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    R = GROUP * n
    rows = tl.arange(0, BLOCK_R)
    rm = rows < R
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (kvh * R + rows[:, None]) * HEAD_DIM + dims[None, :],
                mask=rm[:, None], other=0.0)
    dtype = q.dtype
    if USE_POS:
        qpos = tl.load(pos_ptr + rows % n, mask=rm, other=-1)
        span = tl.load(pos_ptr + n - 1) + 1
    else:
        qpos = rows * 0
        span = cache_len
    per = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_S) * BLOCK_S
    lo = split * per
    hi = tl.minimum(lo + per, span)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    base = kvh * cache_len
    for s0 in range(lo, hi, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        sm = slots < hi
        kt = tl.load(k_ptr + (base + slots[None, :]) * HEAD_DIM + dims[:, None],
                     mask=sm[None, :], other=0.0)                    # [hd, BLOCK_S]
        s = _dot(q, kt, tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32), IEEE)
        s = s.to(dtype).to(tl.float32) * scale
        if USE_POS:
            s = tl.where((slots[None, :] <= qpos[:, None]) & sm[None, :], s, float("-inf"))
        else:
            b = tl.load(bias_ptr + rows[:, None] * cache_len + slots[None, :],
                        mask=rm[:, None] & sm[None, :], other=float("-inf"))
            s = tl.where(sm[None, :], s + b.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # rows with nothing seen
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (base + slots[:, None]) * HEAD_DIM + dims[None, :],
                    mask=sm[:, None], other=0.0)
        acc = _dot(p.to(dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    at = split * HEADS * n + kvh * R + rows
    tl.store(o_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc, mask=rm[:, None])
    tl.store(m_ptr + at, m_i, mask=rm)
    tl.store(l_ptr + at, l_i, mask=rm)


@triton.jit
def attn_out(o_ptr, m_ptr, l_ptr, w_ptr, b_ptr, x_ptr, y_ptr, n, d,
             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y [n, d] = x + o_proj(attention output): program p computes columns p*BLOCK_N..,
    combining the splits of each head (``attend``'s buffers) as it reads them; w [d, H hd]."""
    rows = tl.arange(0, BLOCK_M)
    rm = rows < n
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < d
    sp = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(HEADS):
        m = tl.load(m_ptr + sp[:, None] * HEADS * n + h * n + rows[None, :],
                    mask=rm[None, :], other=float("-inf"))            # [SPLITS, BLOCK_M]
        ll = tl.load(l_ptr + sp[:, None] * HEADS * n + h * n + rows[None, :],
                     mask=rm[None, :], other=0.0)
        top = tl.max(m, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        denom = tl.sum(tl.exp(m - top[None, :]) * ll, axis=0)
        denom = tl.where(denom == 0.0, 1.0, denom)                    # padding rows
        o = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for s in range(SPLITS):
            at = s * HEADS * n + h * n + rows
            ms = tl.load(m_ptr + at, mask=rm, other=float("-inf"))
            part = tl.load(o_ptr + at[:, None] * HEAD_DIM + dims[None, :], mask=rm[:, None],
                           other=0.0)
            o += part * tl.exp(ms - top)[:, None]                     # empty splits: 0
        wt = tl.load(w_ptr + cols[None, :] * (HEADS * HEAD_DIM) + h * HEAD_DIM + dims[:, None],
                     mask=cm[None, :], other=0.0)                     # [hd, BLOCK_N]
        acc = _dot((o / denom[:, None]).to(dtype), wt, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    xy = rows[:, None] * d + cols[None, :]
    mask = rm[:, None] & cm[None, :]
    x = tl.load(x_ptr + xy, mask=mask, other=0.0)
    tl.store(y_ptr + xy, x + acc.to(dtype), mask=mask)


@triton.jit
def rms_gate_up(x_ptr, ln_ptr, w_ptr, a_ptr, n, d, inter, eps, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a [n, inter] = SiLU(gate) * up of RMSNorm(x); w [2 inter, d] (gate rows, then up)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < inter
    rstd = _rstd(x_ptr, n, d, eps, BLOCK_M, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        h = _normed(x_ptr, ln_ptr, rstd, k0, n, d, BLOCK_M, BLOCK_K)
        ks = k0 + tl.arange(0, BLOCK_K)
        km = (ks[:, None] < d) & cm[None, :]
        wg = tl.load(w_ptr + cols[None, :] * d + ks[:, None], mask=km, other=0.0)
        wu = tl.load(w_ptr + (inter + cols[None, :]) * d + ks[:, None], mask=km, other=0.0)
        acc_g = _dot(h, wg, acc_g, IEEE)
        acc_u = _dot(h, wu, acc_u, IEEE)
    dtype = x_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dtype) * acc_u.to(dtype)
    tl.store(a_ptr + rows[:, None] * inter + cols[None, :], a,
             mask=(rows[:, None] < n) & cm[None, :])


@triton.jit
def down_residual(a_ptr, w_ptr, x_ptr, y_ptr, n, d, inter, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [n, d] = x + a @ w.T; a [n, inter], w [d, inter]."""
    rows = tl.arange(0, BLOCK_M)
    rm = rows < n
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < d
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        av = tl.load(a_ptr + rows[:, None] * inter + ks[None, :],
                     mask=rm[:, None] & (ks[None, :] < inter), other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * inter + ks[:, None],
                     mask=(ks[:, None] < inter) & cm[None, :], other=0.0)
        acc = _dot(av, wt, acc, IEEE)
    xy = rows[:, None] * d + cols[None, :]
    mask = rm[:, None] & cm[None, :]
    x = tl.load(x_ptr + xy, mask=mask, other=0.0)
    tl.store(y_ptr + xy, x + acc.to(x_ptr.dtype.element_ty), mask=mask)
