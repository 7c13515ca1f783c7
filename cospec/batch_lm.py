"""One model's forwards for the batch engine (``fast_batch.BatchEngine``): per-row static KV
caches, rotary tables, and the forwards over rows 0..b-1 of n tokens each.

- Layer l's K/V cache is [rows, kv_heads, max_len, head_dim]; slot r's token at position p
  lives at [r, :, p], and a query at position p attends to slots <= p of its own row only.
- On CUDA each forward over (rows b, n tokens, span) is one CUDA graph, captured at its
  first use (``fast_batch_warm.warm_up`` captures them ahead); prefill passes are padded to
  ``prefill_shape`` and replayed from that shape's graph (COSPEC_PREFILL). On CPU it all
  runs eagerly, in the CPU's measured linear order (``cpu.fast_linear``).
- Where the fused layers run (``fast.fused_wanted``: by default a GPU of compute capability
  9 or more), a forward over one row (b = 1: a lone request, which takes slot 0) runs
  through them on that row's caches (``BatchLM._forward_one``), as the batch-1 engine's
  steps do, and so does a step of b >= 2 rows of n tokens each (a decode step, a verify, a
  catch-up) with b * n <= ``fused.ROWS_TOKENS`` (64), each row attending its own
  cache (``_forward_rows``; COSPEC_FUSED_ROWS=0 turns it off). Other forwards (more tokens,
  prefill) keep the compiled layer halves. On an H100 the fused decode rows made 1.32x the
  halves' tokens/s at 4 rows and 1.27x at 16 (random 1.5B, target-only;
  results/gpu/h100/fused-decode-rows-random), and the fused verifies batched spd 1.40x /
  1.36x at 2 / 3 rows (results/gpu/h100/fused-verify-rows-real-pair).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cospec.cpu import fast_linear
from cospec.errors import CospecError
from cospec.fast import (
    Engine,
    _qkv,
    _rest,
    _rms,
    attention_shape,
    capture_graph,
    final_norm,
    fused_wanted,
    layer_functions,
    positioned_layers,
    prefill_mode,
    supported,
)
from cospec.settings import choice

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill pass (bounds its attention mask)
PREFILL_MIN = 16  # graph prefill: prompts are padded to PREFILL_MIN·2^i (or max_len)
GRAPH_TOKENS = 16  # the most tokens a row a forward replays from a CUDA graph (more: eager)


def fused_rows_setting() -> bool:
    """COSPEC_FUSED_ROWS: where an engine's fused layers run, steps of 2 or more rows of n
    tokens each (b * n <= ``fused.ROWS_TOKENS``) through them too, each row attending its own
    cache (1, unset: the default), or on the compiled layer halves (0)."""
    return choice("COSPEC_FUSED_ROWS", ("1", "0"), "1") == "1"


class BatchLM:
    """One model's per-row static KV caches, rotary tables and per-(b, n) CUDA graphs.

    ``run(ids, pos)`` computes rows 0..b-1 (ids, pos [b, n] on the device: token ids and
    their positions), writes their K/V at [row, :, pos] and returns logits [b, n, V] and
    final hidden states [b, n, d] in the model's dtype (on CUDA the graph's static buffers:
    valid until the same (b, n, span) runs again). Attention reads the first ``span`` slots
    of each row's cache only (set by the engine before a step; every position of the step
    must be < span): the reads grow with the longest sequence, not with ``max_len``. One
    row (b = 1) of <= ``fused.MAX_ROWS`` tokens goes through the fused layers where they
    run (``fused``, ``_forward_one``), and so do b >= 2 rows of n tokens each where
    b * n <= ``fused.ROWS_TOKENS`` (``fused_rows``, ``_forward_rows``).
    """

    group = None  # never a tensor-parallel shard (``fused.unsupported`` asks)

    def __init__(self, model: torch.nn.Module, rows: int, max_len: int,
                 graphs: bool | None = None, compile: bool | None = None,
                 fused: bool | None = None, tokens: int = GRAPH_TOKENS):
        """``tokens``: the most tokens a row a forward replays from a CUDA graph (longer
        forwards run eagerly)."""
        if not supported(model):
            raise CospecError(f"{type(model).__name__} is not a model the fast path supports "
                              "(Llama-family, SiLU MLP, full attention)")
        cfg, base = model.config, model.model
        self.model = model  # the key of its CPU linear-order choice (cospec.cpu.fast_linear)
        p = next(model.parameters())
        self.device, self.dtype, self.rows, self.max_len = p.device, p.dtype, rows, max_len
        self.heads, self.kv_heads, self.head_dim = attention_shape(cfg)
        self.eps, self.scale = cfg.rms_norm_eps, self.head_dim ** -0.5
        self.embed, self.norm = base.embed_tokens.weight, base.norm.weight
        head = model.get_output_embeddings()
        self.head_w, self.head_b = head.weight, head.bias
        self.layers = [Engine._layer(layer) for layer in base.layers]
        with torch.inference_mode(False), torch.no_grad():
            shape = (rows, self.kv_heads, max_len, self.head_dim)
            self.kc = [torch.zeros(shape, device=self.device, dtype=self.dtype)
                       for _ in self.layers]
            self.vc = [torch.zeros_like(k) for k in self.kc]
            self.slots = torch.arange(max_len, device=self.device)
            cos, sin = base.rotary_emb(self.norm[None], self.slots[None])
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [L, hd]
            self.row_ids = torch.arange(rows, device=self.device)
            self.ids = torch.zeros(rows, tokens, dtype=torch.long, device=self.device)
            self.pos = torch.zeros_like(self.ids)
        self.span = max_len
        self.use_graphs, compiled, self.qkv, self.rest = layer_functions(self.device, graphs,
                                                                          compile)
        self.fused = fused_wanted(self, fused)  # one row (slot 0) through cospec.fused
        self.fused_rows = self.fused and fused_rows_setting()  # decode steps of more rows
        mode = prefill_mode()  # see fast.prefill_mode
        self.compiled_prefill = mode == "compiled" and compiled
        self.graph_prefill = (mode in ("graphs", "all-graphs")  # CPU: nothing to capture
                              and self.use_graphs)
        self.graphs: dict[tuple[int, int, int], tuple] = {}  # (b, n, span) -> (graph, logits,
        #                                                        hidden)
        self.prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (b, n) -> graph
        if self.graph_prefill:  # the padded passes' static inputs: token ids, slots
            with torch.inference_mode(False), torch.no_grad():
                self.prefill_ids = torch.zeros(rows, max_len, dtype=torch.long,
                                               device=self.device)
                self.prefill_rows = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, first: int, eager: bool,
                 rows: torch.Tensor | None = None, head: bool = True, span: int | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Rows first..first+b-1, or the slots ``rows`` [b] when given (eager only);
        ids, pos [b, n] -> logits [b, n, V] (None unless ``head``), hidden [b, n, d].
        Attends over the first ``span`` (default ``self.span``) slots; pos < span."""
        b, n = ids.shape
        if not eager and rows is None and not first and self._one_row(b, n):
            return self._forward_one(ids[0], pos[0], head)
        if not eager and rows is None and not first and self._rows_decode(b, n):
            return self._forward_rows(ids, pos, head)
        span = self.span if span is None else span
        qkv, rest = (_qkv, _rest) if eager else (self.qkv, self.rest)
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]          # [b, 1, n, hd]
        visible = self.slots[:span] <= pos[..., None]                       # [b, n, span]
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        bias = bias.masked_fill(~visible, float("-inf")).repeat(
            1, self.heads // self.kv_heads, 1)[:, None]                     # [b, 1, G*n, L]
        row = (self.row_ids[:b] if rows is None else rows)[:, None].expand(b, n)
        for w, k_all, v_all in zip(self.layers, self.kc, self.vc):
            kc, vc = (k_all[first:first + b, :, :span], v_all[first:first + b, :, :span]) \
                if rows is None else (k_all, v_all)
            q, k, v = qkv(x, cos, sin, w, self.heads, self.kv_heads, self.eps)
            kc[row, :, pos] = k.transpose(1, 2)                             # [b, n, KVH, hd]
            vc[row, :, pos] = v.transpose(1, 2)
            if rows is not None:  # the given slots' caches, gathered after the write
                kc, vc = k_all[rows, :, :span], v_all[rows, :, :span]
            x = rest(x, q, kc, vc, bias, w, self.scale, self.eps)
        h = _rms(x, self.norm, self.eps)
        return (F.linear(h, self.head_w, self.head_b) if head else None), h

    def _one_row(self, b: int, n: int) -> bool:
        """A forward the fused layers take: one row (slot 0) of <= MAX_ROWS tokens."""
        from cospec.fused import MAX_ROWS

        return self.fused and b == 1 and n <= MAX_ROWS

    def _rows_decode(self, b: int, n: int) -> bool:
        """A forward the fused layers take row by row: a step of b >= 2 rows of n tokens
        each (a decode step, a verify, a catch-up), b * n <= ``fused.ROWS_TOKENS``, each row
        attending its own cache (``fused``'s ``per_row``)."""
        from cospec import fused

        return self.fused_rows and b > 1 and b * n <= fused.ROWS_TOKENS

    def _forward_rows(self, ids: torch.Tensor, pos: torch.Tensor, head: bool
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Rows 0..b-1, n tokens each, through the fused layers, every row on its own
        cache row: ids, pos [b, n] -> logits [b, n, V] (None unless ``head``), hidden
        [b, n, d]. Token j of row i attends slots <= pos[i, j] of its row whatever the
        span."""
        from cospec.fused import attention_mlp, rms_qkv_rope

        b, n = ids.shape
        pos = pos.reshape(-1).contiguous()  # the kernels read it by address
        x = positioned_layers(self, F.embedding(ids.reshape(-1), self.embed), pos, self.kc,
                              self.vc,
                              functools.partial(rms_qkv_rope, per_row=True, row_tokens=n),
                              functools.partial(attention_mlp, per_row=True, row_tokens=n))
        h = final_norm(self, x, eager=False)
        logits = F.linear(h, self.head_w, self.head_b).view(b, n, -1) if head else None
        return logits, h.view(b, n, -1)

    def _forward_one(self, ids: torch.Tensor, pos: torch.Tensor, head: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Slot 0 alone through the fused layers (``fast.Engine``'s few-row forward, on
        that row's caches [kv_heads, max_len, hd]): ids, pos [n] (positions non-decreasing,
        as every step's are) -> logits [1, n, V] (None unless ``head``), hidden [1, n, d].
        Its attention reads slots <= pos[i] whatever the span."""
        from cospec.fused import attention_mlp, rms_qkv_rope

        pos = pos.contiguous()  # the kernels read it by address (a no-op for every caller's)
        x = positioned_layers(self, F.embedding(ids, self.embed), pos,
                              [k[0] for k in self.kc], [v[0] for v in self.vc], rms_qkv_rope,
                              attention_mlp)
        h = final_norm(self, x, eager=False)
        return (F.linear(h, self.head_w, self.head_b)[None] if head else None), h[None]

    def run(self, ids: torch.Tensor, pos: torch.Tensor, first: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = ids.shape
        if not self.use_graphs or first or n > self.ids.shape[1]:  # eagerly
            if not first and (self._one_row(b, n) or self._rows_decode(b, n)):  # fused
                return self._forward(ids, pos, 0, eager=False)
            with fast_linear(self.model, self.device, b, n):  # a CPU's order for b * n rows
                return self._forward(ids, pos, first, eager=True)
        self.ids[:b, :n].copy_(ids)
        self.pos[:b, :n].copy_(pos)
        if (b, n, self.span) not in self.graphs:
            self.graphs[b, n, self.span] = self._capture(b, n)
        graph, logits, hidden = self.graphs[b, n, self.span]
        graph.replay()
        return logits, hidden

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> None:
        """Write the K/V of each ``prompts[i]`` at positions 0.. of slot ``slots[i]``, in
        passes of at most PREFILL_TOKENS padded tokens (or one prompt); no output head: only
        the caches are kept. Eagerly, or through the compiled layer halves with
        COSPEC_PREFILL=compiled (``fast.prefill_mode``), or with COSPEC_PREFILL=graphs or
        all-graphs (the default) each pass padded to a ``prefill_shape`` and replayed from
        that shape's CUDA graph (``prefill_graph``). Shorter prompts are padded at the end:
        the padding's K/V land beyond the row's length, where no query looks before the row
        overwrites them. Empty prompts are skipped."""
        todo = [(list(p), s) for p, s in zip(prompts, slots) if len(p)]
        while todo:
            m = 1
            while m < len(todo) and self._pass_tokens(todo[:m + 1]) <= PREFILL_TOKENS:
                m += 1
            part, todo = todo[:m], todo[m:]
            if self.graph_prefill:
                self.prefill_graph(part)
                continue
            n = max(len(p) for p, _ in part)
            ids = torch.tensor([p + [0] * (n - len(p)) for p, _ in part], device=self.device)
            rows = torch.tensor([s for _, s in part], device=self.device)
            self._forward(ids, self.slots[:n].expand(m, n), 0, eager=not self.compiled_prefill,
                          rows=rows, head=False, span=n)

    def _pass_tokens(self, part: Sequence[tuple[list[int], int]]) -> int:
        """The padded tokens of one prefill pass over ``part`` ((prompt, slot) pairs)."""
        n = max(len(p) for p, _ in part)
        if not self.graph_prefill:
            return len(part) * n
        b, n = self.prefill_shape(len(part), n)  # len(part) <= rows: distinct slots
        return b * n

    def prefill_shape(self, m: int, n: int) -> tuple[int, int]:
        """Graph prefill (COSPEC_PREFILL=graphs, all-graphs): the padded (rows, length) of a
        pass over m prompts of at most n tokens: rows 2^i >= m (capped at the engine's rows),
        length PREFILL_MIN·2^i >= n (capped at max_len)."""
        b, padded = 1, PREFILL_MIN
        while b < m:
            b *= 2
        while padded < n:
            padded *= 2
        return min(b, self.rows), min(padded, self.max_len)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every padded (rows, length) a graph-replayed prefill pass can take, the largest
        pass first."""
        shapes = {self.prefill_shape(2 ** i, 2 ** j) for i in range(self.rows.bit_length() + 1)
                  for j in range(self.max_len.bit_length() + 1)}
        return sorted((s for s in shapes if s[0] == 1 or s[0] * s[1] <= PREFILL_TOKENS),
                      key=lambda s: (-s[0] * s[1], -s[1]))

    def prefill_graph(self, part: Sequence[tuple[list[int], int]]) -> None:
        """One pass over ``part`` ((prompt, slot) pairs) padded to its ``prefill_shape``:
        its static inputs written, then that shape's graph replayed (captured at its first
        use). The padding rows repeat the last prompt into its slot (the same K/V written
        twice); the padding tokens are zeros, their K/V beyond the row's length."""
        b, n = self.prefill_shape(len(part), max(len(p) for p, _ in part))
        part = [*part, *[part[-1]] * (b - len(part))]
        ids = torch.zeros(b, n, dtype=torch.long)
        for i, (p, _) in enumerate(part):
            ids[i, :len(p)] = torch.as_tensor(p)
        self.prefill_ids[:b, :n].copy_(ids)
        self.prefill_rows[:b].copy_(torch.as_tensor([s for _, s in part]))
        if (b, n) not in self.prefill_graphs:
            self.prefill_graphs[b, n] = self._capture_graph(lambda: self._prefill_pass(b, n))[0]
        self.prefill_graphs[b, n].replay()

    def _prefill_pass(self, b: int, n: int) -> None:
        """The padded pass over prefill_ids[:b, :n] into the slots prefill_rows[:b] (eager
        kernels: a graph replays them without their dispatch)."""
        self._forward(self.prefill_ids[:b, :n], self.slots[:n].expand(b, n), 0, eager=True,
                      rows=self.prefill_rows[:b], head=False, span=n)

    def _capture_graph(self, forward) -> tuple[torch.cuda.CUDAGraph, object]:
        """(graph, forward's outputs): ``forward`` run twice on a side stream (lazy inits
        and allocations happen outside the capture), then captured in the shared pool. The
        two runs compute what the static buffers hold, so their K/V writes are real ones."""
        t0 = time.perf_counter()
        graph, out = capture_graph(self.device, self.pool, forward)
        self.capture_s += time.perf_counter() - t0
        return graph, out

    def _capture(self, b: int, n: int) -> tuple:
        """Capture the forward of (b, n) over the buffers that hold its ids and positions;
        returns (graph, logits, hidden)."""
        ids, pos = self.ids[:b, :n], self.pos[:b, :n]
        graph, (logits, hidden) = self._capture_graph(
            lambda: self._forward(ids, pos, 0, eager=False))
        return graph, logits, hidden
