"""All the layers of a one-row step (a decode step) in one persistent Triton launch.

``cospec.fused`` runs a layer as five kernels. Between two of them every program of the
second waits for the whole first grid to end, and its weights can be read early only by the
programs the GPU already holds. Here one launch runs the step's every layer: its work is cut
into tasks, in this order for each layer (bf16 / fp16 / fp32, one token, the layer's weights
as ``fast.Engine._layer`` holds them):

1. q/k/v: RMSNorm, QC columns of each RoPE half of one of the H + 2 KVH stacked heads,
   (+ bias), RoPE; q to a buffer, k and v to the cache slot ``pos``;
2. attention: one query head over one of SPLITS shares of the cache slots 0..pos (an
   online softmax in blocks of BLOCK_S slots); the head's last share to finish combines
   the shares' states;
3. o_proj (+ bias) + residual: ON output columns;
4. RMSNorm + gate/up + SiLU(gate) * up: UN columns of each;
5. down_proj + residual: DN output columns.

Task t goes to program t mod P (P programs, all resident at once: ``programs``), which
takes its tasks in increasing order. A task loads its weights (nothing written in the
launch), then waits until the stage before it is done (a counter of finished tasks per
layer and stage, polled with acquire atomics), then reads its activations, computes, stores
and counts itself in (a release atomic). So a program's weight reads for its next task
overlap the stage still running elsewhere, across layer boundaries too, with no launch
between stages. A task waits only on tasks of smaller index, and a program takes its tasks
in order, so the smallest unfinished task can always run: no deadlock while the P programs
are resident. Triton's interpreter runs the programs one after another; there P = 1.

A wait polls at most SPINS times. Should a stage never finish (a counter wrong, programs
not resident), the task's output is NaN, the counter is set as if the stage had finished (the
other waits on it pass at once) and the launch ends: a wrong step, not a hung GPU.

Rounding follows ``cospec.kernels`` (and so the reference): each projection's output is
rounded to the model's dtype before anything else uses it; sums, softmax and RoPE's
products in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STAGES = 5          # task kinds a layer (the module docstring's list)
SLOTS = 10          # pointers a layer in the table: ``_TABLE``
_TABLE = ("ln1", "qkv_w", "qkv_b", "o_w", "o_b", "ln2", "gate_up_w", "down_w", "k", "v")


@triton.jit
def _ptr(tab_ptr, layer, i: tl.constexpr, dtype: tl.constexpr):
    """Layer ``layer``'s pointer number i of the table (``_TABLE``), as a pointer to dtype,
    16-byte aligned (``unsupported`` checks): without the hint the compiler cannot widen the
    weights' loads, and reads them 2 bytes a thread."""
    return tl.multiple_of(tl.load(tab_ptr + layer * 10 + i).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _now():
    """The GPU's global timer, in nanoseconds (int64; the same clock on every SM)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _sm():
    """The SM this program runs on (int32)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _wait(cnt_ptr, need, SPINS: tl.constexpr, tr, TRACE: tl.constexpr):
    """Poll counter cnt until it reaches ``need`` (acquire: what the counted tasks stored is
    then visible); 1.0, or NaN if it did not within SPINS polls. TRACE: the time it is
    reached goes to tr[1] (``_now``)."""
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    polls = 1
    while (seen < need) & (polls < SPINS):
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < need:                                  # given up: later waits on it pass at once
        tl.atomic_max(cnt_ptr, need, sem="relaxed", scope="gpu")
    if TRACE:
        tl.store(tr + 1, _now())
    return tl.where(seen >= need, 1.0, float("nan"))


@triton.jit
def _done(cnt_ptr):
    """Count this task in on its stage's counter, after every thread's stores."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _tiles(w_ptr, rows, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[rows, :K] as a tuple of its [BLOCK_K, len(rows)] blocks, transposed (loaded now)."""
    tiles = ()
    for k0 in tl.static_range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        tiles = tiles + (tl.load(w_ptr + rows[None, :] * K + ks[:, None],
                                 mask=ks[:, None] < K, other=0.0),)
    return tiles


@triton.jit
def _column(a_ptr, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """a[k0:k0 + BLOCK_K] of an activation row written in this launch, as a column
    [BLOCK_K, 1] (read from L2: another SM wrote it)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(a_ptr + ks[:, None], mask=ks[:, None] < K, other=0.0, cache_modifier=".cg")


@triton.jit
def _normed_sums(x_ptr, ln_ptr, eps, tiles_a, tiles_b, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """RMSNorm(x) @ the two weights whose ``_tiles`` are given: ([C], [C]) float32 sums. x is
    read once (its blocks and the norm's weights loaded together, then the statistics)."""
    xs = ()
    ws = ()
    for k0 in tl.static_range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xs = xs + (_column(x_ptr, k0, K, BLOCK_K),)
        ws = ws + (tl.load(ln_ptr + ks[:, None], mask=ks[:, None] < K, other=0.0),)
    ss = tl.zeros([BLOCK_K, 1], dtype=tl.float32)
    for i in tl.static_range((K + BLOCK_K - 1) // BLOCK_K):
        ss += xs[i].to(tl.float32) * xs[i].to(tl.float32)
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc_a = tl.zeros(tiles_a[0].shape, dtype=tl.float32)
    acc_b = tl.zeros(tiles_b[0].shape, dtype=tl.float32)
    for i in tl.static_range((K + BLOCK_K - 1) // BLOCK_K):
        h = ((xs[i].to(tl.float32) * rstd[None, :]).to(xs[i].dtype) * ws[i]).to(tl.float32)
        acc_a += h * tiles_a[i].to(tl.float32)
        acc_b += h * tiles_b[i].to(tl.float32)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _sums(a_ptr, tiles, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """a @ the weight whose ``_tiles`` are given: [C] float32 sums."""
    acc = tl.zeros(tiles[0].shape, dtype=tl.float32)
    for i in tl.static_range((K + BLOCK_K - 1) // BLOCK_K):
        acc += _column(a_ptr, i * BLOCK_K, K, BLOCK_K).to(tl.float32) * tiles[i].to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit
def _qkv(x_ptr, q_ptr, tab_ptr, cos_ptr, sin_ptr, cnt_ptr, layer, r, pos, kv_len, eps,
         D: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr,
         QC: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, ND: tl.constexpr,
         SPINS: tl.constexpr, tr, TRACE: tl.constexpr):
    """Stage 1, task r of layer ``layer``: head r // (HD/2/QC) of the stacked H + 2 KVH, QC
    columns of each RoPE half."""
    HALF: tl.constexpr = HD // 2
    dtype = x_ptr.dtype.element_ty
    head = r // (HALF // QC)
    cols = (r % (HALF // QC)) * QC + tl.arange(0, QC)
    w1 = head * HD + cols
    w_ptr = _ptr(tab_ptr, layer, 1, dtype)
    t1 = _tiles(w_ptr, w1, D, BK)
    t2 = _tiles(w_ptr, w1 + HALF, D, BK)
    c1 = tl.load(cos_ptr + pos * HD + cols).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * HD + HALF + cols).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * HD + cols).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * HD + HALF + cols).to(tl.float32)
    if HAS_BIAS:
        b_ptr = _ptr(tab_ptr, layer, 2, dtype)
        b1 = tl.load(b_ptr + w1).to(tl.float32)
        b2 = tl.load(b_ptr + w1 + HALF).to(tl.float32)
    ok = _wait(cnt_ptr + tl.maximum(layer - 1, 0) * 5 + 4, tl.where(layer > 0, ND, 0), SPINS,
               tr, TRACE)
    acc1, acc2 = _normed_sums(x_ptr, _ptr(tab_ptr, layer, 0, dtype), eps, t1, t2, D, BK)
    if HAS_BIAS:
        acc1 += b1
        acc2 += b2
    a1 = (acc1 * ok).to(dtype).to(tl.float32)
    a2 = (acc2 * ok).to(dtype).to(tl.float32)
    if head < HEADS + KV_HEADS:                                      # RoPE on q and k
        r1 = (a1 * c1 - a2 * s1).to(dtype)
        r2 = (a2 * c2 + a1 * s2).to(dtype)
    else:
        r1 = a1.to(dtype)
        r2 = a2.to(dtype)
    if head < HEADS:
        out = q_ptr + head * HD + cols
    elif head < HEADS + KV_HEADS:
        out = _ptr(tab_ptr, layer, 8, dtype) + ((head - HEADS) * kv_len + pos) * HD + cols
    else:
        out = (_ptr(tab_ptr, layer, 9, dtype)
               + ((head - HEADS - KV_HEADS) * kv_len + pos) * HD + cols)
    tl.store(out, r1)
    tl.store(out + HALF, r2)
    _done(cnt_ptr + layer * 5)


@triton.jit
def _attend(q_ptr, attn_ptr, part_ptr, tab_ptr, cnt_ptr, layer, r, pos, kv_len, scale,
            LAYERS: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr,
            BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, NQ: tl.constexpr,
            SPINS: tl.constexpr, tr, TRACE: tl.constexpr):
    """Stage 2, task r of layer ``layer``: query head r // SPLITS over its share r % SPLITS
    of the cache slots 0..pos (SPLITS shares of ceil((pos + 1) / SPLITS) slots, the last
    ones shorter or empty). SPLITS > 1: the share's online-softmax state goes to part
    (acc [H SPLITS, HD], then m and l [H SPLITS] each), and the head's last share to finish
    (its counter, per layer and head, follows the stages' in cnt: ``counters``) combines
    them into attn."""
    dtype = q_ptr.dtype.element_ty
    head = r // SPLITS
    kvh = head // (HEADS // KV_HEADS)
    base = kvh * kv_len
    share = (pos + SPLITS) // SPLITS
    lo = (r % SPLITS) * share
    hi = tl.minimum(lo + share, pos + 1)
    k_ptr = _ptr(tab_ptr, layer, 8, dtype)
    v_ptr = _ptr(tab_ptr, layer, 9, dtype)
    dims = tl.arange(0, HD)
    ok = _wait(cnt_ptr + layer * 5, NQ, SPINS, tr, TRACE)
    q = tl.load(q_ptr + head * HD + dims, cache_modifier=".cg").to(tl.float32)
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HD], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        sm = slots < hi
        at = (base + slots[:, None]) * HD + dims[None, :]
        k = tl.load(k_ptr + at, mask=sm[:, None], other=0.0, cache_modifier=".cg")
        v = tl.load(v_ptr + at, mask=sm[:, None], other=0.0, cache_modifier=".cg")
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(sm, s.to(dtype).to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        pv = p.to(dtype).to(tl.float32)[:, None] * v.to(tl.float32)
        acc = acc * alpha + tl.sum(pv, axis=0)
        m_i = m_new
    if SPLITS == 1:
        tl.store(attn_ptr + head * HD + dims, (acc * ok / l_i).to(dtype))
    else:
        ml = part_ptr + HEADS * SPLITS * HD
        tl.store(part_ptr + r * HD + dims, acc * ok)
        tl.store(ml + r + tl.arange(0, 1), m_i)
        tl.store(ml + HEADS * SPLITS + r + tl.arange(0, 1), l_i)
        tl.debug_barrier()
        shares_done = cnt_ptr + LAYERS * 5 + layer * HEADS + head
        # the head's last share to finish combines the shares' states
        if tl.atomic_add(shares_done, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            at = head * SPLITS + tl.arange(0, SPLITS)
            m = tl.load(ml + at, cache_modifier=".cg")       # an empty share: -inf, weight 0
            w = tl.exp(m - tl.max(m, axis=0))
            l_s = tl.load(ml + HEADS * SPLITS + at, cache_modifier=".cg")
            a = tl.load(part_ptr + at[:, None] * HD + dims[None, :], cache_modifier=".cg")
            out = tl.sum(w[:, None] * a, axis=0) / tl.sum(w * l_s, axis=0)
            tl.store(attn_ptr + head * HD + dims, out.to(dtype))
    _done(cnt_ptr + layer * 5 + 1)


@triton.jit
def _project(a_ptr, x_ptr, y_ptr, tab_ptr, cnt_ptr, layer, r, w_at: tl.constexpr,
             b_at: tl.constexpr, stage: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, NEED: tl.constexpr,
             SPINS: tl.constexpr, tr, TRACE: tl.constexpr):
    """Stages 3 and 5: y[cols] = x[cols] + (a @ w[cols].T + b[cols]) for the C columns of
    task r; a [K], w [D, K] (table entry w_at, bias b_at), after stage ``stage`` - 1 of the
    layer has NEED tasks done."""
    dtype = y_ptr.dtype.element_ty
    cols = r * C + tl.arange(0, C)
    cm = cols < D
    rows = tl.where(cm, cols, 0)
    tiles = _tiles(_ptr(tab_ptr, layer, w_at, dtype), rows, K, BK)
    if HAS_BIAS:
        bias = tl.load(_ptr(tab_ptr, layer, b_at, dtype) + rows).to(tl.float32)
    ok = _wait(cnt_ptr + layer * 5 + stage - 1, NEED, SPINS, tr, TRACE)
    x = tl.load(x_ptr + rows, cache_modifier=".cg")                  # with a's reads
    acc = _sums(a_ptr, tiles, K, BK)
    if HAS_BIAS:
        acc += bias
    tl.store(y_ptr + cols, x + (acc * ok).to(dtype), mask=cm)
    _done(cnt_ptr + layer * 5 + stage)


@triton.jit
def _gate_up(x_ptr, act_ptr, tab_ptr, cnt_ptr, layer, r, eps, D: tl.constexpr,
             INTER: tl.constexpr, UN: tl.constexpr, BK: tl.constexpr, NO: tl.constexpr,
             SPINS: tl.constexpr, tr, TRACE: tl.constexpr):
    """Stage 4: act[cols] = SiLU(gate) * up of RMSNorm(x) for the UN columns of task r."""
    dtype = x_ptr.dtype.element_ty
    cols = r * UN + tl.arange(0, UN)
    cm = cols < INTER
    rows = tl.where(cm, cols, 0)
    w_ptr = _ptr(tab_ptr, layer, 6, dtype)
    tg = _tiles(w_ptr, rows, D, BK)
    tu = _tiles(w_ptr, rows + INTER, D, BK)
    ok = _wait(cnt_ptr + layer * 5 + 2, NO, SPINS, tr, TRACE)
    acc_g, acc_u = _normed_sums(x_ptr, _ptr(tab_ptr, layer, 5, dtype), eps, tg, tu, D, BK)
    g = (acc_g * ok).to(dtype).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dtype) * acc_u.to(dtype)
    tl.store(act_ptr + cols, a, mask=cm)
    _done(cnt_ptr + layer * 5 + 3)


@triton.jit
def _bulk_prefetch(ptr, nbytes, on):
    """Ask the copy engine to bring ``nbytes`` (a multiple of 16) from ``ptr`` (16-byte
    aligned) into L2 (sm90's ``cp.async.bulk.prefetch.L2``), where ``on``; an int32 0."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $3, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r,r", [ptr, nbytes, on], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch(tab_ptr, t, dtype: tl.constexpr, LAYERS: tl.constexpr, D: tl.constexpr,
              HEADS: tl.constexpr, HD: tl.constexpr, INTER: tl.constexpr, QC: tl.constexpr,
              ON: tl.constexpr, UN: tl.constexpr, DN: tl.constexpr, NQ: tl.constexpr,
              NA: tl.constexpr, NO: tl.constexpr, NU: tl.constexpr, ND: tl.constexpr,
              WARPS: tl.constexpr):
    """Bring task t's weights into L2 ahead of it (nothing for an attention task or past
    the last task): at most two spans of whole rows, each one bulk prefetch by one thread.
    NQ .. ND: ``layers``'."""
    HALF: tl.constexpr = HD // 2
    PER: tl.constexpr = NQ + NA + NO + NU + ND
    ELEM: tl.constexpr = dtype.primitive_bitwidth // 8
    layer = tl.minimum(t // PER, LAYERS - 1)
    r = t % PER
    if r < NQ:                                                   # q/k/v: two halves of a head
        at, k, rows, second = 1, D, QC, HALF
        first = (r // (HALF // QC)) * HD + (r % (HALF // QC)) * QC
    elif r < NQ + NA:                                            # attention: no weights
        at, k, rows, second, first = 1, D, 0, 0, 0
    elif r < NQ + NA + NO:                                       # o_proj
        c = (r - NQ - NA) * ON
        at, k, rows, second, first = 3, HEADS * HD, tl.minimum(ON, D - c), 0, c
    elif r < NQ + NA + NO + NU:                                  # gate and up
        c = (r - NQ - NA - NO) * UN
        at, k, rows, second, first = 6, D, tl.minimum(UN, INTER - c), INTER, c
    else:                                                        # down_proj
        c = (r - NQ - NA - NO - NU) * DN
        at, k, rows, second, first = 7, INTER, tl.minimum(DN, D - c), 0, c
    rows = tl.where(t < LAYERS * PER, rows, 0)
    base = tl.load(tab_ptr + layer * 10 + at).to(tl.pointer_type(dtype))
    lane = tl.arange(0, WARPS * 32)
    span = first + tl.where(lane == 1, second, 0)
    on = ((lane == 0) | ((lane == 1) & (second > 0))) & (rows > 0)
    _bulk_prefetch(base + span * k, rows * k * ELEM, on.to(tl.int32))


@triton.jit
def layers(x_ptr, x1_ptr, q_ptr, attn_ptr, part_ptr, act_ptr, tab_ptr, cos_ptr, sin_ptr,
           pos_ptr, cnt_ptr, trace_ptr, kv_len, eps, scale, LAYERS: tl.constexpr,
           D: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr,
           INTER: tl.constexpr, QKV_BIAS: tl.constexpr, O_BIAS: tl.constexpr,
           QC: tl.constexpr, ON: tl.constexpr, UN: tl.constexpr, DN: tl.constexpr,
           BK: tl.constexpr, OBK: tl.constexpr, DBK: tl.constexpr, BLOCK_S: tl.constexpr,
           SPLITS: tl.constexpr, SPINS: tl.constexpr, AHEAD: tl.constexpr, WARPS: tl.constexpr,
           TRACE: tl.constexpr, NQ: tl.constexpr, NA: tl.constexpr, NO: tl.constexpr,
           NU: tl.constexpr, ND: tl.constexpr):
    """Every layer of a one-row step (the module docstring). x [D]: the input row, replaced
    by the last layer's output; x1 [D], q [H hd], attn [H hd], act [INTER]: the step's
    buffers; part float32 [H SPLITS (hd + 2)]: the attention's shares (``_attend``); tab
    [LAYERS, 10] int64: each layer's pointers (``_TABLE``); cos, sin [L, hd] the rotary
    tables; pos [1] the token's position (its cache slot); cnt [LAYERS (5 + H)] int32
    zeros: tasks done per layer and stage, then attention shares done per layer and head
    (``counters``). Program p runs tasks p, p + P, ... AHEAD > 0
    (compiled for sm90 on): as it starts task t, the program has the weights of its task
    t + AHEAD * P brought into L2 (``_prefetch``), the first AHEAD tasks' before the first;
    WARPS: the launch's num_warps. TRACE: task t writes trace[t] = (start, its wait over,
    end: ``_now``; its SM), int64 [LAYERS * tasks a layer, 4]. NQ, NA, NO, NU, ND: the tasks
    a layer of each stage (``stage_tasks``)."""
    PER: tl.constexpr = NQ + NA + NO + NU + ND
    pos = tl.load(pos_ptr)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    P = tl.num_programs(0)
    for i in tl.static_range(AHEAD):
        _prefetch(tab_ptr, tl.program_id(0) + i * P, dtype, LAYERS, D, HEADS, HD, INTER, QC,
                  ON, UN, DN, NQ, NA, NO, NU, ND, WARPS)
    for t in range(tl.program_id(0), LAYERS * PER, P):
        if AHEAD > 0:
            _prefetch(tab_ptr, t + AHEAD * P, dtype, LAYERS, D, HEADS, HD, INTER, QC, ON, UN,
                      DN, NQ, NA, NO, NU, ND, WARPS)
        layer = t // PER
        r = t % PER
        tr = trace_ptr + t * 4
        if TRACE:
            tl.store(tr, _now())
        if r < NQ:
            _qkv(x_ptr, q_ptr, tab_ptr, cos_ptr, sin_ptr, cnt_ptr, layer, r, pos, kv_len, eps,
                 D, HEADS, KV_HEADS, HD, QC, BK, QKV_BIAS, ND, SPINS, tr, TRACE)
        elif r < NQ + NA:
            _attend(q_ptr, attn_ptr, part_ptr, tab_ptr, cnt_ptr, layer, r - NQ, pos, kv_len,
                    scale, LAYERS, HEADS, KV_HEADS, HD, BLOCK_S, SPLITS, NQ, SPINS, tr, TRACE)
        elif r < NQ + NA + NO:
            _project(attn_ptr, x_ptr, x1_ptr, tab_ptr, cnt_ptr, layer, r - NQ - NA, 3, 4, 2,
                     HEADS * HD, D, ON, OBK, O_BIAS, NA, SPINS, tr, TRACE)
        elif r < NQ + NA + NO + NU:
            _gate_up(x1_ptr, act_ptr, tab_ptr, cnt_ptr, layer, r - NQ - NA - NO, eps, D, INTER,
                     UN, BK, NO, SPINS, tr, TRACE)
        else:
            _project(act_ptr, x1_ptr, x_ptr, tab_ptr, cnt_ptr, layer, r - NQ - NA - NO - NU,
                     7, 7, 4, INTER, D, DN, DBK, False, NU, SPINS, tr, TRACE)
        if TRACE:
            tl.store(tr + 2, _now())
            tl.store(tr + 3, _sm().to(tl.int64))


def _pow2_at_most(n: int, cap: int) -> int:
    """The largest power of two <= min(n, cap) (at least 1)."""
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def _table(engine, kc: list[torch.Tensor], vc: list[torch.Tensor]) -> torch.Tensor:
    """[layers, 10] int64: each layer's pointers in ``_TABLE``'s order (0 where a bias is
    absent), made once an engine and cache (a CUDA graph reads it at every replay)."""
    key = tuple(t.data_ptr() for t in (*kc, *vc))
    have = getattr(engine, "_persistent_table", None)
    if have is not None and have[0] == key:
        return have[1]
    rows = []
    for w, k, v in zip(engine.layers, kc, vc):
        ln1, qkv_w, qkv_b, _, _, o_w, o_b, ln2, gate_up_w, down_w = w
        rows.append([0 if t is None else t.data_ptr()
                     for t in (ln1, qkv_w, qkv_b, o_w, o_b, ln2, gate_up_w, down_w, k, v)])
    table = torch.tensor(rows, dtype=torch.int64, device=engine.device)
    engine._persistent_table = (key, table)
    return table


def unsupported(engine, kc: list[torch.Tensor]) -> str | None:
    """Why this launch cannot run ``engine``'s one-row steps (beyond ``fused.unsupported``),
    or None."""
    if any(t.shape != kc[0].shape or not t.is_contiguous() for t in kc):
        return "caches of several shapes"
    if any(t is not None and t.data_ptr() % 16 for w in engine.layers for t in w) or any(
            t.data_ptr() % 16 for t in kc):
        return "weights not 16-byte aligned"
    return None


def _settings(fused, d: int, inter: int, hd: int, heads: int) -> dict:
    """The launch's tile constexprs from ``cospec.fused``'s PERSIST_* settings, fitted to a
    model of hidden size d, MLP size inter, head_dim hd (each a power of two no larger than
    what it tiles)."""
    return {"QC": _pow2_at_most(hd // 2, fused.PERSIST_QKV_BLOCK_C),
            "ON": _pow2_at_most(d, fused.PERSIST_OUT_BLOCK_N),
            "UN": _pow2_at_most(inter, fused.PERSIST_UP_BLOCK_N),
            "DN": _pow2_at_most(d, fused.PERSIST_DOWN_BLOCK_N),
            "BK": _pow2_at_most(_up2(d), fused.PERSIST_BLOCK_K),
            "OBK": _pow2_at_most(_up2(heads * hd), fused.PERSIST_BLOCK_K),
            "DBK": _pow2_at_most(_up2(inter), fused.PERSIST_DOWN_BLOCK_K),
            "BLOCK_S": fused.PERSIST_BLOCK_S, "SPLITS": fused.PERSIST_SPLITS,
            "SPINS": fused.PERSIST_SPINS}


def _up2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_PROGRAMS: dict[tuple, int] = {}


def resident(regs: int, shared: int, warps: int) -> int:
    """Programs of ``warps`` warps, ``regs`` registers a thread and ``shared`` bytes of shared
    memory that fit one sm90 SM at once: 64 Ki registers (a warp's taken in 256s), 227 KiB
    of shared memory (1 KiB reserved a program), 64 warps, 32 programs."""
    by_regs = 65536 // (-(-max(regs, 1) * 32 // 256) * 256 * warps)
    by_shared = (227 * 1024) // (shared + 1024)
    return min(by_regs, by_shared, 32, 64 // warps)


def programs(compiled, device: torch.device, per_sm: int) -> int:
    """Programs of the launch: all resident at once (the deadlock-free condition of the
    module docstring). ``per_sm`` > 0: that many an SM, but never more than fit; 0: as many
    as fit (``resident``, by the compiled kernel's registers, shared memory and warps)."""
    compiled._init_handles()  # loads the binary: its n_regs
    fit = resident(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return sms * (min(fit, per_sm) if per_sm > 0 else fit)


def launch(x: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, kv_len: int, layer: tuple, layers_n: int, heads: int,
           kv_heads: int, eps: float, fused, ahead: int | None = None,
           trace: torch.Tensor | None = None) -> tuple[tuple, dict]:
    """(positional arguments, constexprs and num_warps) of ``layers`` over x [1, d] for a
    model of ``layers_n`` layers shaped as ``layer`` (``fast.Engine._layer``'s tuple);
    ``fused``: the module whose PERSIST_* settings set the tiles; ``ahead``: AHEAD
    (None: PERSIST_AHEAD); ``trace``: int64 [tasks, 4] the tasks' times (``layers``' TRACE),
    or None. Allocates the step's buffers and its zeroed counters (``counters``)."""
    _, qkv_w, qkv_b, _, _, o_w, o_b, _, gate_up_w, _ = layer
    d, inter = x.shape[1], gate_up_w.shape[0] // 2
    hd = o_w.shape[1] // heads
    splits = fused.PERSIST_SPLITS
    args = (x, torch.empty_like(x), x.new_empty(heads * hd), x.new_empty(heads * hd),
            x.new_empty(heads * splits * (hd + 2), dtype=torch.float32), x.new_empty(inter),
            table, cos, sin, pos, counters(layers_n, heads, x.device),
            table if trace is None else trace, kv_len, eps, hd ** -0.5)
    consts = dict(LAYERS=layers_n, D=d, HEADS=heads, KV_HEADS=kv_heads, HD=hd, INTER=inter,
                  QKV_BIAS=qkv_b is not None, O_BIAS=o_b is not None,
                  **_settings(fused, d, inter, hd, heads), num_warps=fused.PERSIST_WARPS,
                  WARPS=fused.PERSIST_WARPS,
                  AHEAD=fused.PERSIST_AHEAD if ahead is None else ahead,
                  TRACE=trace is not None,
                  **({"maxnreg": fused.PERSIST_MAX_REGS} if fused.PERSIST_MAX_REGS else {}))
    consts.update(zip(("NQ", "NA", "NO", "NU", "ND"), stage_tasks(consts)))
    return args, consts


def stage_tasks(consts: dict) -> list[int]:
    """Tasks a layer of each stage (q/k/v, attention, o_proj, gate/up, down_proj) of a launch
    with ``launch``'s constexprs (its NQ .. ND): task t of layer l is number l * sum + t."""
    d, inter, hd, heads = consts["D"], consts["INTER"], consts["HD"], consts["HEADS"]
    return [(heads + 2 * consts["KV_HEADS"]) * (hd // 2 // consts["QC"]),
            heads * consts["SPLITS"],
            -(-d // consts["ON"]), -(-inter // consts["UN"]), -(-d // consts["DN"])]


def counters(layers_n: int, heads: int, device: torch.device) -> torch.Tensor:
    """A step's counters, int32 zeros [layers_n (STAGES + heads)]: tasks done per layer and
    stage, then attention shares done per layer and query head."""
    return torch.zeros(layers_n * (STAGES + heads), dtype=torch.int32, device=device)


def step_layers(engine, x: torch.Tensor, pos: torch.Tensor, kc: list[torch.Tensor],
                vc: list[torch.Tensor], interpreted: bool, trace: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``engine``'s layers over one token x [1, d] at position pos [1] in one launch
    (``layers``): its K/V go to slot pos of kc[l], vc[l] [KVH, L, hd], the attention reads
    slots <= pos, RoPE's cos and sin are the engine's rotary tables at row pos. -> [1, d]
    (x itself, overwritten). P programs (``programs``), one under the interpreter.
    ``trace``: see ``launch`` (``tasks`` rows)."""
    from cospec import fused

    x = x.contiguous()
    inter = engine.layers[0][8].shape[0] // 2
    aligned = all(k * x.element_size() % 16 == 0  # bulk copies take 16-byte rows
                  for k in (x.shape[1], engine.heads * engine.head_dim, inter))
    args, consts = launch(x, pos, _table(engine, kc, vc), engine.cos, engine.sin, kc[0].shape[1],
                          engine.layers[0], len(engine.layers), engine.heads, engine.kv_heads,
                          engine.eps, fused, 0 if interpreted or not aligned else None, trace)
    if interpreted:
        grid = 1
    else:
        key = (x.device, x.dtype, fused.PERSIST_PER_SM, *sorted(consts.items()))
        grid = _PROGRAMS.get(key)
        if grid is None:
            compiled = layers.warmup(*args, grid=(1,), **consts)
            grid = _PROGRAMS[key] = programs(compiled, x.device, fused.PERSIST_PER_SM)
    layers[(grid,)](*args, **consts)
    return x
