"""Triton kernels of one transformer layer over a few rows (``cospec.fused`` launches them).

Five kernels a layer, each reading its weights once for all n <= 16 rows (tl.dot over a block
of BLOCK_M >= 16 rows, the padding rows masked; or, for one row, BLOCK_M = 1: products and
sums on the CUDA cores, see ``_mac``):

1. ``rms_qkv_rope``: RMSNorm, the stacked q/k/v projection (+ bias), RoPE on q and k; q to
   a buffer [H, n, hd], k and v straight into their cache slots (or [KVH, n, hd] buffers).
2. ``attend``: split-K decode attention (flash-decoding): program (kv head, split, chunk)
   scores the G = H / KVH query heads of its kv head, n rows each (or a chunk of them, when
   the launcher shares them out over programs), over its share of the visible slots with an
   online softmax; partial sums (unnormalised output, max, denominator) go to [SPLITS, H, n]
   buffers, and the last of a (kv head, chunk)'s programs to arrive combines them into the
   attention output [n, H hd] (once per kv head and chunk, not once per o_proj program). A
   short cache (ONE_S slots or fewer) is attended by split 0 alone, with no combine.
3. ``down_residual`` as o_proj (+ bias) and the residual add.
4. ``rms_gate_up``: RMSNorm, the stacked gate/up projection, SiLU(gate) * up.
5. ``down_residual``: down_proj and the residual add.

Split-K: a projection of few output columns (a decode step's GEMV) leaves most SMs idle when
each program owns a column tile and walks the whole reduction, so the projections also spread
the reduction over SPLIT_K programs (grid axis ``split``). Each writes its float32 partial
sums to a workspace ws [SPLIT_K, n, columns] and counts itself in on the tile's counter; the
last of a tile's programs to arrive (whichever it is) adds the SPLIT_K partials in split
order (deterministic), runs the epilogue (bias, RoPE, SiLU, residual add: exactly once) and
resets the counter to 0 for the next launch. Counters are zero between launches, so launches
sharing one counter buffer must run one after another (one stream). SPLIT_K = 1: no
workspace, no counter.

The kernels that normalise their input first (q/k/v, gate/up) load their first block of
weights before the activations (HOIST = 1): the weights' HBM latency then overlaps the
RMSNorm's read of x instead of following it. HOIST = 2: every block of an unrolled one-row
reduction (o_proj and down_proj too) before the activations.

Programmatic dependent launch (PDL > 0, Hopper on): each kernel may start while the previous
one of the stream still runs. A program loads its hoisted weights, then waits for the
previous kernel to finish (``griddepcontrol.wait``) before it reads an activation or writes
anything. Before the wait it reads only what no kernel of the chain writes: weights, and
the step's cos / sin and cache slots, which the step's own torch ops wrote before its first
fused kernel (a kernel launched without PDL starts its successor only when it ends). PDL = 1
lets the next kernel start once every program of this one is past its wait, PDL = 2 at once.

int8 weights (W8, ``fused.Int8``): the three projection kernels (and ``down_residual`` as an
lm_head, RESIDUAL off) can read a weight kept as int8 with one float32 scale a row, w ~ q *
s: the reduction runs over q, exactly as over any weight, and the epilogue multiplies each
output column by its row's scale before the bias and the rounding. One byte a weight
instead of two: the decode step of a small model is mostly weight reads.

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
def _zeros(BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
           SWAP: tl.constexpr):
    """A projection's float32 accumulator: [BLOCK_M, BLOCK_N] (tl.dot's, BLOCK_M >= 16), or
    transposed, [BLOCK_N, BLOCK_M], under SWAP (the weight's columns on tl.dot's M side, the
    rows on N); for one row (BLOCK_M = 1) [BLOCK_K, BLOCK_N], each reduction lane's products
    summed over the blocks on the CUDA cores, reduced over the lanes once at the end
    (``_total``)."""
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    elif SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _mac(a, b, acc, IEEE: tl.constexpr, SWAP: tl.constexpr):
    """acc + a @ b for a [BLOCK_M, BLOCK_K], b [BLOCK_K, BLOCK_N] into ``_zeros``' acc. One
    row (a decode step's GEMV) comes as a column a [BLOCK_K, 1]: products on the CUDA cores,
    exact in float32, no 16-row padding and no reduction until ``_total``. b may be int8 (a
    W8 launch's weights): converted to a's dtype first, exactly (|b| <= 127). For one row
    that keeps the registers of an unrolled int8 reduction whose tiles are all loaded early
    (HOIST = 2) near the bf16 one's: straight to float32, sm90's ptxas gave the 0.5B's
    gate/up 168 registers a thread (3 programs an SM), through bf16 102 (bf16 weights: 96).
    SWAP (few rows): acc [BLOCK_N, BLOCK_M] + b.T @ a.T, the weight tile on tl.dot's M side
    (Hopper's wgmma takes M >= 64: column tiles of 64 or more), the rows on N."""
    if a.shape[1] == 1:
        acc += a.to(tl.float32) * b.to(a.dtype).to(tl.float32)
    elif SWAP:
        acc = _dot(tl.trans(b.to(a.dtype)), tl.trans(a), acc, IEEE)
    else:
        acc = _dot(a, b.to(a.dtype), acc, IEEE)
    return acc


@triton.jit
def _total(acc, BLOCK_M: tl.constexpr, SWAP: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] sums of a ``_zeros`` / ``_mac`` accumulator."""
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=0)[None, :]
    elif SWAP:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _scaled(acc, scale):
    """A W8 launch's sums acc [BLOCK_M, BLOCK_N] of int8 weights times their rows' scales
    [BLOCK_N] (float32): a @ (q * s).T, as (a @ q.T) * s."""
    return acc * scale[None, :]


@triton.jit
def _pair(w_ptr, ra, rb, k0, D: tl.constexpr, cm, BLOCK_K: tl.constexpr):
    """The weight tiles w[ra, k0:k0 + BLOCK_K].T and w[rb, ...].T ([BLOCK_K, len(ra)]) of a
    matrix w [., D], columns where cm (and k < D) only."""
    ks = k0 + tl.arange(0, BLOCK_K)
    km = (ks[:, None] < D) & cm[None, :]
    return (tl.load(w_ptr + ra[None, :] * D + ks[:, None], mask=km, other=0.0),
            tl.load(w_ptr + rb[None, :] * D + ks[:, None], mask=km, other=0.0))


@triton.jit
def _after_weights(PDL: tl.constexpr):
    """Programmatic dependent launch (module docstring): let the next kernel start (PDL = 2:
    now; 1: after the wait) and wait for the previous one. A no-op at PDL = 0."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _early_pairs(w_ptr, ra, rb, lo, D: tl.constexpr, cm, BLOCK_K: tl.constexpr,
                 COUNT: tl.constexpr):
    """The ``_pair`` tiles of the COUNT reduction blocks from lo, loaded now (a tuple)."""
    early = ()
    for i in tl.static_range(COUNT):
        early = early + (_pair(w_ptr, ra, rb, lo + i * BLOCK_K, D, cm, BLOCK_K),)
    return early


@triton.jit
def _rstd(x_ptr, n, D: tl.constexpr, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the rows of x [n, D], in float32 ([BLOCK_M]). Unrolled:
    the loads do not wait on each other (every program of a split-K grid runs this); the
    squares summed lane by lane, then across the lanes once. One row: x read as columns
    [BLOCK_K, 1], the layout ``_normed`` gives it (no layout conversion between them)."""
    if BLOCK_M == 1:
        ss = tl.zeros([BLOCK_K, 1], dtype=tl.float32)
        for k0 in tl.static_range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + ks[:, None], mask=ks[:, None] < D, other=0.0).to(tl.float32)
            ss += xv * xv
        total = tl.sum(ss, axis=0)
    else:
        rows = tl.arange(0, BLOCK_M)
        ss = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in tl.static_range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + rows[:, None] * D + ks[None, :],
                         mask=(rows[:, None] < n) & (ks[None, :] < D), other=0.0)
            ss += xv.to(tl.float32) * xv.to(tl.float32)
        total = tl.sum(ss, axis=1)
    return tl.rsqrt(total / D + eps)


@triton.jit
def _publish(acc, ws_ptr, split, rows, cols, n, ncols):
    """Store a program's partial sums acc [BLOCK_M, BLOCK_N] (float32) of columns ``cols`` at
    ws[split, rows, cols]; ws [SPLIT_K, n, ncols]."""
    tl.store(ws_ptr + (split * n + rows[:, None]) * ncols + cols[None, :], acc,
             mask=(rows[:, None] < n) & (cols[None, :] < ncols))


@triton.jit
def _arrive(cnt_ptr, tile, SPLIT_K: tl.constexpr):
    """Count this program in on output tile ``tile``'s counter (after its ``_publish``); True
    for the last of the tile's SPLIT_K programs, which resets the counter to 0."""
    tl.debug_barrier()  # every thread's partial sums stored before the release below
    seen = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = seen == SPLIT_K - 1
    tl.store(cnt_ptr + tile, 0, mask=last)
    return last


@triton.jit
def _gather(ws_ptr, rows, cols, n, ncols, last, SPLIT_K: tl.constexpr):
    """The sum over splits 0, 1, .. of ws[split, rows, cols] (float32), read by the last
    program only (the others get zeros and must store nothing)."""
    mask = tl.where(last, (rows[:, None] < n) & (cols[None, :] < ncols), False)
    at = ws_ptr + rows[:, None] * ncols + cols[None, :]
    acc = tl.load(at, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(at + s * n * ncols, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _reduce(acc, ws_ptr, cnt_ptr, split, tile, rows, cols, n, ncols, SPLIT_K: tl.constexpr):
    """(the whole reduction's acc, this program runs the epilogue) of a program's partial
    sums acc [BLOCK_M, BLOCK_N] of output columns ``cols`` in a SPLIT_K grid."""
    if SPLIT_K > 1:
        _publish(acc, ws_ptr, split, rows, cols, n, ncols)
        last = _arrive(cnt_ptr, tile, SPLIT_K)
        acc = _gather(ws_ptr, rows, cols, n, ncols, last, SPLIT_K)
    else:
        last = split == 0                                            # the only split
    return acc, last


@triton.jit
def _ln(ln_ptr, k0, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The RMSNorm weights of columns k0..k0+BLOCK_K (0 past D) as ``_normed`` applies them:
    [BLOCK_K] ([BLOCK_K, 1] for one row)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        w = tl.load(ln_ptr + ks[:, None], mask=ks[:, None] < D, other=0.0)
    else:
        w = tl.load(ln_ptr + ks, mask=ks < D, other=0.0)
    return w


@triton.jit
def _x_block(x_ptr, k0, n, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0..k0+BLOCK_K of x [n, D]: [BLOCK_M, BLOCK_K] (rows past n 0), or for one
    row the column [BLOCK_K, 1]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        xv = tl.load(x_ptr + ks[:, None], mask=ks[:, None] < D, other=0.0)
    else:
        rows = tl.arange(0, BLOCK_M)
        xv = tl.load(x_ptr + rows[:, None] * D + ks[None, :],
                     mask=(rows[:, None] < n) & (ks[None, :] < D), other=0.0)
    return xv


@triton.jit
def _apply_norm(xv, w, rstd, BLOCK_M: tl.constexpr):
    """RMSNorm of a ``_x_block`` as the reference rounds it: w * (x * rstd).to(dtype)."""
    if BLOCK_M == 1:
        h = (xv.to(tl.float32) * rstd[None, :]).to(xv.dtype) * w
    else:
        h = (xv.to(tl.float32) * rstd[:, None]).to(xv.dtype) * w[None, :]
    return h


@triton.jit
def _normed(x_ptr, ln_ptr, rstd, k0, n, D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """Columns k0..k0+BLOCK_K of RMSNorm(x) (``_apply_norm``), [BLOCK_M, BLOCK_K]; for one
    row (BLOCK_M = 1) the column [BLOCK_K, 1] ``_mac`` takes."""
    if BLOCK_M == 1:
        xv = _x_block(x_ptr, k0, n, D, BLOCK_M, BLOCK_K)
        w = _ln(ln_ptr, k0, D, BLOCK_M, BLOCK_K)
    else:
        w = _ln(ln_ptr, k0, D, BLOCK_M, BLOCK_K)
        xv = _x_block(x_ptr, k0, n, D, BLOCK_M, BLOCK_K)
    return _apply_norm(xv, w, rstd, BLOCK_M)


@triton.jit
def _normed_pair(x_ptr, ln_ptr, w_ptr, ra, rb, cm, lo, k_per, n, eps, D: tl.constexpr,
                 IEEE: tl.constexpr, HOIST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr,
                 SPLIT_EARLY: tl.constexpr, LN_AHEAD: tl.constexpr, SWAP: tl.constexpr):
    """RMSNorm(x) @ w[ra].T and @ w[rb].T ([BLOCK_M, len(ra)] each, float32) over x's
    columns lo..lo + k_per. The weights of the first block (HOIST = 1), of every block when
    unrolled (HOIST = 2), or of the SPLIT_EARLY blocks of a split's whole share (k_per =
    SPLIT_EARLY blocks; looped) are loaded before x is read and before the PDL wait.
    UNROLL (one split: lo = 0, k_per >= D): the loop over D unrolled, so that every block's
    loads can be issued before the first product waits on one. Looped, LN_AHEAD: each
    block's RMSNorm weights are read one block ahead (the first before the wait), so the
    loop's products never wait on them; the software pipeline does not take these loads
    (a thread's share of a block is under the 4 bytes an asynchronous copy moves)."""
    acc_a = _zeros(BLOCK_M, BLOCK_K, ra.shape[0], SWAP)
    acc_b = _zeros(BLOCK_M, BLOCK_K, ra.shape[0], SWAP)
    if UNROLL:
        EARLY: tl.constexpr = (D + BLOCK_K - 1) // BLOCK_K if HOIST == 2 else min(HOIST, 1)
    else:
        EARLY: tl.constexpr = SPLIT_EARLY if SPLIT_EARLY > 0 else min(HOIST, 1)
    early = _early_pairs(w_ptr, ra, rb, lo, D, cm, BLOCK_K, EARLY)
    start = lo + EARLY * BLOCK_K                                     # the loop's first block
    if LN_AHEAD and not UNROLL:
        ln_w = _ln(ln_ptr, start, D, BLOCK_M, BLOCK_K)
    _after_weights(PDL)
    rstd = _rstd(x_ptr, n, D, eps, BLOCK_M, BLOCK_K)
    if UNROLL:
        for k0 in tl.static_range(0, D, BLOCK_K):
            h = _normed(x_ptr, ln_ptr, rstd, k0, n, D, BLOCK_M, BLOCK_K)
            if k0 // BLOCK_K < EARLY:
                wa, wb = early[k0 // BLOCK_K]
            else:
                wa, wb = _pair(w_ptr, ra, rb, k0, D, cm, BLOCK_K)
            acc_a = _mac(h, wa, acc_a, IEEE, SWAP)
            acc_b = _mac(h, wb, acc_b, IEEE, SWAP)
    else:
        for i in tl.static_range(EARLY):
            wa, wb = early[i]
            h = _normed(x_ptr, ln_ptr, rstd, lo + i * BLOCK_K, n, D, BLOCK_M, BLOCK_K)
            acc_a = _mac(h, wa, acc_a, IEEE, SWAP)
            acc_b = _mac(h, wb, acc_b, IEEE, SWAP)
        for k0 in range(start, tl.minimum(lo + k_per, D), BLOCK_K):
            if LN_AHEAD:
                ln_next = _ln(ln_ptr, k0 + BLOCK_K, D, BLOCK_M, BLOCK_K)
                h = _apply_norm(_x_block(x_ptr, k0, n, D, BLOCK_M, BLOCK_K), ln_w, rstd,
                                BLOCK_M)
                ln_w = ln_next
            else:
                h = _normed(x_ptr, ln_ptr, rstd, k0, n, D, BLOCK_M, BLOCK_K)
            wa, wb = _pair(w_ptr, ra, rb, k0, D, cm, BLOCK_K)
            acc_a = _mac(h, wa, acc_a, IEEE, SWAP)
            acc_b = _mac(h, wb, acc_b, IEEE, SWAP)
    return _total(acc_a, BLOCK_M, SWAP), _total(acc_b, BLOCK_M, SWAP)


@triton.jit(do_not_specialize=["n"])
def rms_qkv_rope(x_ptr, ln_ptr, w_ptr, b_ptr, s_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr,
                 v_ptr, ws_ptr, cnt_ptr, n, kv_len, row_stride, row_tokens, k_per, eps,
                 D: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, W8: tl.constexpr,
                 IEEE: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_K: tl.constexpr, HOIST: tl.constexpr, UNROLL: tl.constexpr,
                 PDL: tl.constexpr, SPLIT_EARLY: tl.constexpr, LN_AHEAD: tl.constexpr,
                 SWAP: tl.constexpr, ROPE_TABLE: tl.constexpr):
    """Program (head j of the H + 2 KVH stacked heads, chunk c, split s): output columns
    c*BLOCK_C.. of both halves of head j (RoPE pairs column i with i + hd/2), reduced over
    x's columns s*k_per.. (k_per a multiple of BLOCK_K). x [n, D]; w [(H + 2 KVH) hd, D];
    cos, sin [n, hd] (ROPE_TABLE: the rotary tables [L, hd], row i's at row slot[i]);
    q [H, n, hd]; k, v [KVH, kv_len, hd], row i written to slot slot[i] (row_stride > 0:
    k, v [rows, KVH, kv_len, hd], row_stride = KVH kv_len, row i to cache row
    i // row_tokens: each cache row's row_tokens tokens in turn);
    ws [SPLIT_K, n, (H + 2 KVH) hd] float32; cnt [>= (H + 2 KVH) * chunks] int32, zeros.
    W8: w is int8 and s [(H + 2 KVH) hd] (float32) its rows' scales (``_scaled``)."""
    head = tl.program_id(0)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)      # in the first half
    w1 = head * HEAD_DIM + cols                                      # weight rows
    w2 = w1 + HALF
    rn = rows[:, None] < n
    slots = tl.load(slot_ptr + rows, mask=rows < n, other=0)
    at = slots if ROPE_TABLE else rows                               # the rows of cos, sin
    trig = at[:, None] * HEAD_DIM + cols[None, :]                    # the epilogue's operands,
    c1 = tl.load(cos_ptr + trig, mask=rn, other=0.0).to(tl.float32)  # loaded early
    c2 = tl.load(cos_ptr + trig + HALF, mask=rn, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig, mask=rn, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + HALF, mask=rn, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b1 = tl.load(b_ptr + w1).to(tl.float32)
        b2 = tl.load(b_ptr + w2).to(tl.float32)
    if W8:
        sc1 = tl.load(s_ptr + w1)
        sc2 = tl.load(s_ptr + w2)
    acc1, acc2 = _normed_pair(x_ptr, ln_ptr, w_ptr, w1, w2, cols >= 0, split * k_per, k_per,
                              n, eps, D, IEEE, HOIST, BLOCK_M, BLOCK_K, UNROLL, PDL,
                              SPLIT_EARLY, LN_AHEAD, SWAP)
    if SPLIT_K > 1:
        width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        _publish(acc1, ws_ptr, split, rows, w1, n, width)
        _publish(acc2, ws_ptr, split, rows, w2, n, width)
        last = _arrive(cnt_ptr, head * tl.num_programs(1) + tl.program_id(1), SPLIT_K)
        acc1 = _gather(ws_ptr, rows, w1, n, width, last, SPLIT_K)
        acc2 = _gather(ws_ptr, rows, w2, n, width, last, SPLIT_K)
    else:
        last = split == 0                                            # the only split
    if W8:
        acc1 = _scaled(acc1, sc1)
        acc2 = _scaled(acc2, sc2)
    if HAS_BIAS:
        acc1 += b1[None, :]
        acc2 += b2[None, :]
    dtype = x_ptr.dtype.element_ty
    a1 = acc1.to(dtype).to(tl.float32)
    a2 = acc2.to(dtype).to(tl.float32)
    rm = tl.where(last, rn, False)                                   # the epilogue: once
    hv = head + rows[:, None] * 0                                    # head, as a [M, 1] block
    is_q = hv < HEADS
    is_v = hv >= HEADS + KV_HEADS
    r1 = tl.where(is_v, a1, a1 * c1 - a2 * s1).to(dtype)             # RoPE on q and k
    r2 = tl.where(is_v, a2, a2 * c2 + a1 * s2).to(dtype)
    qo = q_ptr + (head * n + rows[:, None]) * HEAD_DIM + cols[None, :]
    tl.store(qo, r1, mask=rm & is_q)
    tl.store(qo + HALF, r2, mask=rm & is_q)
    kvh = tl.where(is_q, 0, tl.where(is_v, hv - HEADS - KV_HEADS, hv - HEADS))
    cache_row = (rows // row_tokens)[:, None]
    off = (cache_row * row_stride + kvh * kv_len + slots[:, None]) * HEAD_DIM + cols[None, :]
    is_k = ~is_q & ~is_v
    tl.store(k_ptr + off, r1, mask=rm & is_k)
    tl.store(k_ptr + off + HALF, r2, mask=rm & is_k)
    tl.store(v_ptr + off, r1, mask=rm & is_v)
    tl.store(v_ptr + off + HALF, r2, mask=rm & is_v)


@triton.jit(do_not_specialize=["n"])
def attend(q_ptr, k_ptr, v_ptr, pos_ptr, bias_ptr, o_ptr, m_ptr, l_ptr, out_ptr, cnt_ptr,
           n, cache_len, row_stride, row_tokens, scale,
           HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
           SPLITS: tl.constexpr, USE_POS: tl.constexpr, IEEE: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, ONE_S: tl.constexpr,
           HEADS_PER: tl.constexpr, PER_ROW: tl.constexpr, PDL: tl.constexpr):
    """Program (kv head g, split s, chunk c). q [H, n, hd] (rows r = j*n + i of kv head g
    are query head g*G + j, token i); k, v [KVH, cache_len, hd]. The program takes query
    heads j = c*HEADS_PER .. (c + 1)*HEADS_PER - 1 of its kv head (HEADS_PER = G: all, one
    chunk). USE_POS: token i sees slots <= pos[i], and the slots 0..pos[n-1] are shared out
    over the splits; otherwise every slot, with the additive bias [G*n, cache_len]. Writes
    the split's unnormalised output o [SPLITS, H, n, hd], running max m and denominator
    l [SPLITS, H, n] (float32); the last of (g, c)'s SPLITS programs (counter cnt[g*chunks
    + c]) combines them into out [n, H hd] (the model's dtype: head g*G + j of token i at
    out[i, (g*G + j) hd:]). Up to ONE_S visible slots (0: never) split 0 takes them all and
    writes out itself, and no program stores partials or touches the counter: the store,
    the atomic and the combine's loads are dependent round trips that a short cache need
    not pay. Every cache read waits for the previous kernel (PDL): reading the slots earlier
    steps wrote before the wait was measured slower (results/gpu/h100/attn-kv-early).
    PER_ROW (with USE_POS): the tokens are row_tokens a cache row, the program (g, s, i)
    token i's G query heads over cache row i // row_tokens, k, v [rows, KVH, cache_len, hd]
    (row_stride = KVH cache_len), slots 0..pos[i] (a batch's decode or verify step)."""
    _after_weights(PDL)                                              # no weights to load
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    R = GROUP * n
    last = n - 1                                                     # the token seeing most
    base = kvh * cache_len
    if PER_ROW:                                                      # token i: its own cache
        last = tl.program_id(2)
        rows = tl.arange(0, BLOCK_R) * n + last
        rm = tl.arange(0, BLOCK_R) < GROUP
        tile = kvh * n + last
        base += (last // row_tokens) * row_stride
    elif HEADS_PER < GROUP:                                          # a chunk of the heads
        first = tl.program_id(2) * HEADS_PER * n
        rows = first + tl.arange(0, BLOCK_R)
        rm = rows < tl.minimum(R, first + HEADS_PER * n)
        tile = kvh * tl.num_programs(2) + tl.program_id(2)
    else:
        rows = tl.arange(0, BLOCK_R)
        rm = rows < R
        tile = kvh
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (kvh * R + rows[:, None]) * HEAD_DIM + dims[None, :],
                mask=rm[:, None], other=0.0)
    dtype = q.dtype
    if USE_POS:
        qpos = tl.load(pos_ptr + rows % n, mask=rm, other=-1)
        span = tl.load(pos_ptr + last) + 1
    else:
        qpos = rows * 0
        span = cache_len
    single = span <= ONE_S
    per = tl.where(single, span, tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_S) * BLOCK_S)
    lo = split * per
    hi = tl.minimum(lo + per, span)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):                                # online softmax
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
                    mask=sm[:, None], other=0.0)                     # after the softmax
        acc = _dot(p.to(dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    token = rows % n
    head = kvh * GROUP + rows // n
    out_at = out_ptr + (token[:, None] * HEADS + head[:, None]) * HEAD_DIM + dims[None, :]
    if single:
        if split == 0:
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)                  # padding rows
            tl.store(out_at, (acc / l_safe[:, None]).to(dtype), mask=rm[:, None])
    else:
        _attend_combine(acc, m_i, l_i, o_ptr, m_ptr, l_ptr, out_at, cnt_ptr, kvh, tile, split,
                        n, rows, rm, dims, HEADS, R, HEAD_DIM, SPLITS)


@triton.jit
def _attend_combine(acc, m_i, l_i, o_ptr, m_ptr, l_ptr, out_at, cnt_ptr, kvh, tile, split, n,
                    rows, rm, dims, HEADS: tl.constexpr, R, HEAD_DIM: tl.constexpr,
                    SPLITS: tl.constexpr):
    """``attend``'s split-K end: store this split's partials (acc, m_i, l_i) of kv head
    kvh's rows ``rows``, count in on counter ``tile``, and, in the last program to arrive,
    combine the SPLITS partials into the output (``out_at``, [BLOCK_R, HEAD_DIM] addresses)."""
    at = split * HEADS * n + kvh * R + rows
    tl.store(o_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc, mask=rm[:, None])
    tl.store(m_ptr + at, m_i, mask=rm)
    tl.store(l_ptr + at, l_i, mask=rm)
    last = _arrive(cnt_ptr, tile, SPLITS)
    if last:                                                         # the combination
        rows_at = kvh * R + rows                                     # split 0's
        sp = tl.arange(0, SPLITS)
        ms = tl.load(m_ptr + sp[:, None] * HEADS * n + rows_at[None, :],
                     mask=rm[None, :], other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(l_ptr + sp[:, None] * HEADS * n + rows_at[None, :],
                     mask=rm[None, :], other=0.0, cache_modifier=".cg")
        top = tl.max(ms, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)               # padding rows
        denom = tl.sum(tl.exp(ms - top[None, :]) * ls, axis=0)
        denom = tl.where(denom == 0.0, 1.0, denom)
        o = tl.zeros_like(acc)
        for j in tl.static_range(SPLITS):                             # independent loads
            at_j = j * HEADS * n + rows_at
            m_s = tl.load(m_ptr + at_j, mask=rm, other=float("-inf"), cache_modifier=".cg")
            part = tl.load(o_ptr + at_j[:, None] * HEAD_DIM + dims[None, :], mask=rm[:, None],
                           other=0.0, cache_modifier=".cg")
            o += part * tl.exp(m_s - top)[:, None]                    # empty splits: 0
        tl.store(out_at, (o / denom[:, None]).to(out_at.dtype.element_ty), mask=rm[:, None])


@triton.jit(do_not_specialize=["n"])
def rms_gate_up(x_ptr, ln_ptr, w_ptr, s_ptr, a_ptr, ws_ptr, cnt_ptr, n, inter, k_per, eps,
                D: tl.constexpr, W8: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                HOIST: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr,
                SPLIT_EARLY: tl.constexpr, LN_AHEAD: tl.constexpr, SWAP: tl.constexpr):
    """a [n, inter] = SiLU(gate) * up of RMSNorm(x); w [2 inter, D] (gate rows, then up).
    Program (c, s): columns c*BLOCK_N.. of gate and up, reduced over x's columns s*k_per..;
    ws [SPLIT_K, n, 2 inter] float32. W8: w is int8, s [2 inter] its rows' scales."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < inter
    split = tl.program_id(1)
    if W8:
        sg = tl.load(s_ptr + cols, mask=cm, other=0.0)
        su = tl.load(s_ptr + inter + cols, mask=cm, other=0.0)
    acc_g, acc_u = _normed_pair(x_ptr, ln_ptr, w_ptr, cols, inter + cols, cm, split * k_per,
                                k_per, n, eps, D, IEEE, HOIST, BLOCK_M, BLOCK_K, UNROLL, PDL,
                                SPLIT_EARLY, LN_AHEAD, SWAP)
    if SPLIT_K > 1:
        _publish(acc_g, ws_ptr, split, rows, cols, n, 2 * inter)
        _publish(acc_u, ws_ptr, split, rows, inter + cols, n, 2 * inter)
        last = _arrive(cnt_ptr, tl.program_id(0), SPLIT_K)
        acc_g = _gather(ws_ptr, rows, cols, n, 2 * inter, last, SPLIT_K)
        acc_u = _gather(ws_ptr, rows, inter + cols, n, 2 * inter, last, SPLIT_K)
    else:
        last = split == 0                                            # the only split
    if W8:
        acc_g = _scaled(acc_g, sg)
        acc_u = _scaled(acc_u, su)
    dtype = x_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dtype) * acc_u.to(dtype)
    tl.store(a_ptr + rows[:, None] * inter + cols[None, :], a,
             mask=tl.where(last, (rows[:, None] < n) & cm[None, :], False))


@triton.jit
def _weight_tile(w_ptr, cols, cm, k0, inter, BLOCK_K: tl.constexpr):
    """w[cols, k0:k0 + BLOCK_K].T ([BLOCK_K, len(cols)]; w [., inter]; columns where cm,
    k < inter)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + cols[None, :] * inter + ks[:, None],
                   mask=(ks[:, None] < inter) & cm[None, :], other=0.0)


@triton.jit
def _a_block(a_ptr, rows, rm, k0, inter, BLOCK_K: tl.constexpr):
    """a[rows, k0:k0 + BLOCK_K] (a [n, inter]; rows where rm, k < inter) as ``_mac`` takes
    it: for one row a column [BLOCK_K, 1]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if rows.shape[0] == 1:                                           # one row: a column
        av = tl.load(a_ptr + ks[:, None], mask=ks[:, None] < inter, other=0.0)
    else:
        av = tl.load(a_ptr + rows[:, None] * inter + ks[None, :],
                     mask=rm[:, None] & (ks[None, :] < inter), other=0.0)
    return av


@triton.jit(do_not_specialize=["n"])
def down_residual(a_ptr, w_ptr, b_ptr, s_ptr, x_ptr, y_ptr, ws_ptr, cnt_ptr, n, inter, k_per,
                  D: tl.constexpr, HAS_BIAS: tl.constexpr, W8: tl.constexpr,
                  RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
                  SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr, HOIST: tl.constexpr,
                  PDL: tl.constexpr, SPLIT_EARLY: tl.constexpr, SWAP: tl.constexpr):
    """y [n, D] = x + (a @ w.T + b); a [n, inter], w [D, inter], b [D] (HAS_BIAS). Program
    (c, s): columns c*BLOCK_N.., reduced over a's columns s*k_per..; ws [SPLIT_K, n, D]
    float32. down_proj (a the MLP's activations) and o_proj (a the attention output); with
    RESIDUAL off y = a @ w.T + b (x unread: the lm_head). W8: w is int8, s [D] its rows'
    scales.
    K_BLOCKS > 0 (one split, K_BLOCKS * BLOCK_K >= inter): the reduction's loop unrolled,
    every block's loads free to be issued before the first product; HOIST = 2 then loads
    every block's weights before a (and before the PDL wait). Looped, SPLIT_EARLY > 0
    (k_per = SPLIT_EARLY blocks): the split's whole share of weights is loaded first."""
    rows = tl.arange(0, BLOCK_M)
    rm = rows < n
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < D
    split = tl.program_id(1)
    acc = _zeros(BLOCK_M, BLOCK_K, BLOCK_N, SWAP)
    lo = split * k_per
    if K_BLOCKS > 0:
        EARLY: tl.constexpr = K_BLOCKS if HOIST == 2 else 0
    else:
        EARLY: tl.constexpr = SPLIT_EARLY
    early = ()
    for i in tl.static_range(EARLY):
        early = early + (_weight_tile(w_ptr, cols, cm, lo + i * BLOCK_K, inter, BLOCK_K),)
    _after_weights(PDL)
    if K_BLOCKS > 0:
        for i in tl.static_range(K_BLOCKS):
            av = _a_block(a_ptr, rows, rm, i * BLOCK_K, inter, BLOCK_K)
            if i < EARLY:
                wt = early[i]
            else:
                wt = _weight_tile(w_ptr, cols, cm, i * BLOCK_K, inter, BLOCK_K)
            acc = _mac(av, wt, acc, IEEE, SWAP)
    else:
        for i in tl.static_range(EARLY):
            av = _a_block(a_ptr, rows, rm, lo + i * BLOCK_K, inter, BLOCK_K)
            acc = _mac(av, early[i], acc, IEEE, SWAP)
        for k0 in range(lo + EARLY * BLOCK_K, tl.minimum(lo + k_per, inter), BLOCK_K):
            av = _a_block(a_ptr, rows, rm, k0, inter, BLOCK_K)
            acc = _mac(av, _weight_tile(w_ptr, cols, cm, k0, inter, BLOCK_K), acc, IEEE,
                       SWAP)
    acc = _total(acc, BLOCK_M, SWAP)
    xy = rows[:, None] * D + cols[None, :]
    if RESIDUAL:                                                     # before the handshake
        x = tl.load(x_ptr + xy, mask=rm[:, None] & cm[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if W8:
        sc = tl.load(s_ptr + cols, mask=cm, other=0.0)
    acc, last = _reduce(acc, ws_ptr, cnt_ptr, split, tl.program_id(0), rows, cols, n, D,
                        SPLIT_K)
    if W8:
        acc = _scaled(acc, sc)
    if HAS_BIAS:
        acc += bias[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    if RESIDUAL:
        out = x + out
    tl.store(y_ptr + xy, out, mask=tl.where(last, rm[:, None] & cm[None, :], False))


@triton.jit
def rms_norm(x_ptr, w_ptr, y_ptr, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
             PDL: tl.constexpr):
    """y [n, D] = RMSNorm(x) with weights w [D], rounded as the reference (``_apply_norm``):
    program i normalises row i (BLOCK_D >= D). The model's final norm, one kernel instead of
    torch's half dozen."""
    row = tl.program_id(0)
    ks = tl.arange(0, BLOCK_D)
    km = ks < D
    w = tl.load(w_ptr + ks, mask=km, other=0.0)
    _after_weights(PDL)
    xv = tl.load(x_ptr + row * D + ks, mask=km, other=0.0)
    xf = xv.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    tl.store(y_ptr + row * D + ks, (xf * rstd).to(xv.dtype) * w, mask=km)
