"""The CUDA fast path: a static KV cache indexed by position, each step one CUDA graph.

``StaticLM`` has ``CachedLM``'s interface (``forward`` / ``prefill`` / ``crop`` / ``reset`` /
``length``) for Llama-family models (Qwen2, Qwen3, Llama, Mistral). It runs the model's own
weights through a short functional forward (gpt-fast style; the model is not modified):

- layer l's K/V cache is one preallocated tensor [kv_heads, max_len, head_dim]; the token at
  position p lives in slot p. ``crop(n)`` only moves ``length``: the slots >= n keep stale
  entries (rejected drafts) that no query sees — a query at position p attends to slots <= p
  only, the mask being computed from positions on the device — and the next forward
  overwrites them.
- a forward over n <= MAX_GRAPH tokens is captured once per n as a CUDA graph that reads its
  ids and start position from static device buffers: a step is one graph launch, and the
  only host sync is the caller's read of the logits. On CUDA the two halves of a layer are
  also compiled with ``torch.compile`` (fused elementwise work) unless COSPEC_COMPILE=0.
  On Hopper GPUs and newer (``cospec.fused``: COSPEC_FUSED=auto, the default; 1 or 0 force
  it on or off) those forwards run each layer as five Triton kernels instead (RMSNorm, RoPE,
  the cache writes, attention, SiLU and residual adds folded into the projections).
- a layer's q/k/v projections are read as one stacked weight, and so are gate/up (one
  kernel each instead of three and two): the model's parameters become slices of the
  stacked buffers (``fused``), same values, no second copy.
- longer inputs (prefill) and every input on CPU run the same code eagerly: its exactness
  is tested on CPU against the model's own forward in float64 (COSPEC_PREFILL=compiled:
  prefill through the compiled halves, opt-in).

The heavy part (``Engine``: caches, graphs) is pooled per model, so graphs are captured
once per process; a ``StaticLM`` leases an engine and gives it back when it is collected.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

from cospec.errors import CospecError
from cospec.settings import choice

MAX_GRAPH = 16      # forwards over more tokens than this run eagerly
# COSPEC_PREFILL=all-graphs (the default): a batch-1 prefill of MAX_GRAPH < n <=
# PREFILL_GRAPH_MAX tokens runs the layers as a CUDA graph over the ids padded to a multiple
# of PREFILL_BUCKET
PREFILL_BUCKET = 64
PREFILL_GRAPH_MAX = 1024
LEN_ROUND = 256     # engines' cache lengths are rounded up to this (fewer re-captures)
FAMILIES = ("qwen2", "qwen3", "llama", "mistral")

Weights = tuple  # one layer's tensors, see Engine._layer
PROJECTIONS = (1, 5, 8, 9)  # a layer's q/k/v, o_proj, gate/up and down_proj in ``Weights``


def supported(model: torch.nn.Module) -> bool:
    """A Llama-family causal LM that this forward reproduces: SiLU MLP without biases, full
    attention in every layer (no sliding window)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "mlp_bias", False):
        return False
    if kind in ("llama", "mistral") and getattr(cfg, "sliding_window", None):
        return False
    return all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or [])


def attention_shape(cfg) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a model config (kv heads default to the query
    heads, head dim to hidden size / heads)."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def wanted(model: torch.nn.Module) -> bool:
    """Use the fast path for this model? On CUDA by default; ``COSPEC_EAGER=1`` never,
    ``COSPEC_STATIC=1`` also on CPU (tests). Always for a model that names its own
    ``engine_class`` (a tensor-parallel shard, ``cospec.tp``: it has no other forward)."""
    if getattr(model, "engine_class", None) is not None:
        return True
    if os.environ.get("COSPEC_EAGER") == "1" or not supported(model):
        return False
    device = next(model.parameters()).device
    return device.type == "cuda" or os.environ.get("COSPEC_STATIC") == "1"


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (float32 statistics)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, n, hd] rotated by cos, sin [n, hd] (transformers' rotate_half form)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _qkv(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: Weights, heads: int,
         kv_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a layer: x [..., n, d] -> q [..., heads, n, hd], k, v [..., kv_heads, n,
    hd] (leading dims: rows of a batch, or none); cos, sin broadcast against q."""
    ln1, qkv_w, qkv_b, qn, kn = w[:5]
    *lead, n, _ = x.shape
    h = _rms(x, ln1, eps)
    q, k, v = F.linear(h, qkv_w, qkv_b).view(*lead, n, heads + 2 * kv_heads, -1).split(
        (heads, kv_heads, kv_heads), dim=-2)
    if qn is not None:  # Qwen3: per-head norms before the rotation
        q, k = _rms(q, qn, eps), _rms(k, kn, eps)
    q, k, v = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _rest(x: torch.Tensor, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
          bias: torch.Tensor, w: Weights, scale: float, eps: float,
          group: str | None = None) -> torch.Tensor:
    """Second half of a layer: attention of q [..., H, n, hd] over the whole cache kc, vc
    [..., KVH, L, hd] with the additive mask ``bias`` [..., 1, H/KVH * n, L] or [H/KVH * n,
    L] (0 or -inf), then the MLP (leading dims: rows of a batch, or none). Query heads
    h*G..h*G+G-1 share kv head h (transformers' repeat_kv order).
    ``group``: the process group (name) of a tensor-parallel shard (``cospec.tp``): o_proj
    and down_proj then hold this rank's input columns; their partial outputs are summed."""
    ow, ob, ln2, gate_up_w, dw = w[5:]
    *lead, heads, n, hd = q.shape
    kvh = kc.shape[-3]
    s = torch.matmul(q.reshape(*lead, kvh, heads // kvh * n, hd), kc.transpose(-1, -2)) * scale
    p = torch.softmax(s + bias, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p, vc).view(*lead, heads, n, hd).transpose(-3, -2).reshape(
        *lead, n, heads * hd)
    x = x + _sum(F.linear(o, ow, ob), group)
    h = _rms(x, ln2, eps)
    gate, up = F.linear(h, gate_up_w).chunk(2, dim=-1)
    return x + _sum(F.linear(F.silu(gate) * up, dw), group)


def _sum(x: torch.Tensor, group: str | None) -> torch.Tensor:
    """x summed over the ranks of the process group named ``group`` (a functional
    all-reduce: it can be compiled and captured in a CUDA graph); x itself without one."""
    return x if group is None else funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first linear -> (w, b)
_INT8: weakref.WeakSet = weakref.WeakSet()  # models whose engines read int8 copies


def int8_weights(model: torch.nn.Module) -> None:
    """Let the engines made from now on for ``model`` read int8 copies of its projections
    and lm_head (``fused.quantize``: one scale a row) in their fused forwards (<= MAX_GRAPH
    tokens: decode steps, verifies): one byte a weight instead of two, for a model a little
    off its own (w ~ q * s). Meant for a draft, whose step is all weight reads and whose
    proposals speculative decoding checks whatever they are. Longer forwards (prefill) and
    engines without fused layers use the model's own weights; the model is not modified, and
    the copies add half its bf16 size."""
    _INT8.add(model)


def has_int8(model: torch.nn.Module) -> bool:
    """``int8_weights`` was applied to ``model``."""
    return model in _INT8


def fused(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum of outs, in] (and bias) stacking the rows of ``linears``, so that a
    decode step reads them with one kernel instead of one per linear. The linears'
    parameters are re-pointed at slices of it: the model computes exactly what it did and
    the memory is not doubled; a second engine of the model finds them fused already."""
    known = _FUSED.get(linears[0])
    if known is not None and known[0].data_ptr() == linears[0].weight.data_ptr():
        return known
    with torch.inference_mode(False), torch.no_grad():
        w = torch.cat([m.weight for m in linears])
        b = (torch.cat([m.bias for m in linears])
             if all(m.bias is not None for m in linears) else None)
        if b is None and any(m.bias is not None for m in linears):
            raise CospecError("cannot fuse linears of which only some have a bias")
        row = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = w[row:row + rows]
            if b is not None:
                m.bias.data = b[row:row + rows]
            row += rows
    _FUSED[linears[0]] = (w, b)
    return w, b


class Engine:
    """Static KV cache, rotary tables and per-length CUDA graphs of one model.

    ``run(ids, start)`` computes the forward of ``ids`` at positions start.. and writes their
    K/V into slots start..; it returns logits [n, V] and final hidden states [n, d] in the
    model's dtype, which may be the graph's static buffers (valid until the next run).
    """

    group: str | None = None  # a tensor-parallel process group (cospec.tp); None: whole model

    def __init__(self, model: torch.nn.Module, max_len: int, graphs: bool | None = None,
                 compile: bool | None = None, fused: bool | None = None):
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype, self.max_len = p.device, p.dtype, max_len
        self.heads, self.kv_heads, self.head_dim = attention_shape(cfg)
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        rotary = self._weights(model)
        with torch.inference_mode(False), torch.no_grad():
            shape = (self.kv_heads, max_len, self.head_dim)
            self.kc = [torch.zeros(shape, device=self.device, dtype=self.dtype)
                       for _ in self.layers]
            self.vc = [torch.zeros_like(k) for k in self.kc]
            slots = torch.arange(max_len, device=self.device)
            cos, sin = rotary(self.norm[None], slots[None])
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [L, hd]
            self.slots = slots
            self.steps = torch.arange(MAX_GRAPH, device=self.device)
            self.ids = torch.zeros(MAX_GRAPH, dtype=torch.long, device=self.device)
            self.start = torch.zeros(1, dtype=torch.long, device=self.device)
        functions = layer_functions(self.device, graphs, compile)
        self.fused = fused_wanted(self, fused)
        if self.fused:
            from cospec.fused import fused_layer_functions

            functions = fused_layer_functions(functions)
        self.use_graphs, self.compiled, self.qkv, self.rest = functions
        self.int8_asked = has_int8(model)  # as ``int8_weights`` stood at its making
        self.layers8, self.head8 = self._int8_copies(model)
        mode = prefill_mode()
        self.compiled_prefill = mode == "compiled" and self.compiled and not self.fused
        self.prefill_graphs = mode == "all-graphs" and self.use_graphs and self.group is None
        self.fills: dict[int, torch.cuda.CUDAGraph] = {}  # padded length -> layers' graph
        self.fill_ids: torch.Tensor | None = None  # the padded ids the fill graphs read
        self.fill_start = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple] = {}   # n -> (graph, logits, hidden)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.host = (torch.zeros(MAX_GRAPH + 1, dtype=torch.long, pin_memory=True)
                     if self.use_graphs else None)
        self.staged = torch.cuda.Event() if self.use_graphs else None
        self.capture_s = 0.0  # graph captures (and the compiles they trigger), in seconds

    def _int8_copies(self, model: torch.nn.Module) -> tuple[list | None, object]:
        """(per layer the ``fused.Int8`` copies of q/k/v, o_proj, gate/up and down_proj; the
        lm_head's) for a model marked by ``int8_weights`` whose layers run fused, else
        (None, None), with a warning for a marked model the fused layers do not run."""
        if not has_int8(model):
            return None, None
        if not self.fused:
            warnings.warn("int8 weights are read by the fused layers only (COSPEC_FUSED; by "
                          "default a GPU of compute capability 9 or more): this engine keeps "
                          "the model's own weights", stacklevel=3)
            return None, None
        from cospec.fused import quantize

        layers = [tuple(quantize(w[i]) for i in PROJECTIONS) for w in self.layers]
        return layers, quantize(self.head_w)

    def _weights(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set the weights the forward reads (``embed``, ``norm``, ``head_w``, ``head_b``,
        ``layers``) from ``model``; returns its rotary embedding module."""
        base = model.model
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        head = model.get_output_embeddings()
        self.head_w, self.head_b = head.weight, head.bias
        self.layers = [self._layer(layer) for layer in base.layers]
        return base.rotary_emb

    @staticmethod
    def _layer(layer: torch.nn.Module) -> Weights:
        a, m = layer.self_attn, layer.mlp
        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        qkv_w, qkv_b = fused([a.q_proj, a.k_proj, a.v_proj])
        gate_up_w, _ = fused([m.gate_proj, m.up_proj])
        return (layer.input_layernorm.weight, qkv_w, qkv_b,
                qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight,
                gate_up_w, m.down_proj.weight)

    def _forward(self, ids: torch.Tensor, start: torch.Tensor, eager: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n] (device), start [1] (device) -> logits [n, V], hidden [n, d]."""
        h = final_norm(self, self._layers(ids, start, eager), eager)
        if self.head8 is not None and not eager:
            from cospec.fused import logits

            return logits(h, self.head8, self.head_b), h
        return self._logits(h), h

    def _layers(self, ids: torch.Tensor, start: torch.Tensor, eager: bool) -> torch.Tensor:
        """The layers over ids [n] at positions start.. (their K/V written to those slots) ->
        the last layer's output [n, d], before the final norm."""
        n = ids.shape[0]
        qkv, rest = (_qkv, _rest) if eager else (self.qkv, self.rest)
        pos = start + self.steps[:n] if n <= MAX_GRAPH else start + torch.arange(
            n, device=self.device)
        x = self._embed(ids)
        if self.fused and not eager:  # cache writes inside qkv, mask from positions
            return positioned_layers(self, x, pos, self.kc, self.vc, qkv, rest, self.layers8)
        cos, sin = self.cos[pos], self.sin[pos]
        visible = self.slots[None, :] <= pos[:, None]                       # [n, L]
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        bias = bias.masked_fill(~visible, float("-inf")).repeat(self.heads // self.kv_heads, 1)
        for w, kc, vc in zip(self.layers, self.kc, self.vc):
            q, k, v = qkv(x, cos, sin, w, self.heads, self.kv_heads, self.eps)
            kc.index_copy_(1, pos, k)
            vc.index_copy_(1, pos, v)
            x = rest(x, q, kc, vc, bias, w, self.scale, self.eps, self.group)
        return x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] -> input embeddings [n, d]."""
        return F.embedding(ids, self.embed)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """final hidden states [n, d] -> logits [n, V]."""
        return F.linear(h, self.head_w, self.head_b)

    def run(self, ids: list[int] | torch.Tensor, start: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids``: a list, or a 1-d tensor already on the device (a drafted token: it is
        copied device to device, never read by the host)."""
        n = len(ids)
        if start + n > self.max_len:
            raise CospecError(f"static KV cache full: {start} + {n} tokens > {self.max_len}")
        on_device = isinstance(ids, torch.Tensor)
        if not self.use_graphs or n > MAX_GRAPH:
            x = ids.to(self.device) if on_device else torch.tensor(ids, device=self.device)
            return self._ungraphed(x, torch.tensor([start], device=self.device))
        # stage ids and start through pinned memory: no host sync (the event only waits for
        # the previous copy out of the same host buffer, long done in practice)
        self.staged.synchronize()
        self.host[MAX_GRAPH] = start
        if on_device:
            self.ids[:n].copy_(ids)
        else:
            self.host[:n] = torch.tensor(ids)
            self.ids[:n].copy_(self.host[:n], non_blocking=True)
        self.start.copy_(self.host[MAX_GRAPH:], non_blocking=True)
        self.staged.record()
        return self._replay(n)

    def fill(self, ids: list[int], start: int) -> None:
        """Write the K/V of ``ids`` at positions start.. and nothing else (a prefill: no
        logits). With COSPEC_PREFILL=all-graphs on a GPU, MAX_GRAPH < n <= PREFILL_GRAPH_MAX
        tokens run the layers as one CUDA graph a padded length (``_fill_padded``); other
        fills are ``run``'s forward."""
        n = len(ids)
        padded = -(-n // PREFILL_BUCKET) * PREFILL_BUCKET
        if (not self.prefill_graphs or n <= MAX_GRAPH or padded > PREFILL_GRAPH_MAX
                or start + padded > self.max_len):
            self.run(ids, start)
            return
        self._fill_padded(ids, start, padded)

    def _fill_padded(self, ids: list[int], start: int, padded: int) -> None:
        """``fill`` over ids padded (with id 0) to ``padded`` tokens: the pad rows come after
        the real ones, so no real row sees them, and their K/V land in slots beyond the
        filled length, stale until overwritten (the class invariant). On CUDA with graphs one
        graph a padded length replays the layers on staged ids and start; elsewhere the same
        layers run eagerly (what the CPU tests check). The graphs are captured on first use,
        and a fill from slot 0 captures every padded length the cache holds at once
        (``_capture_fills``), so that later prompts (in a timed run, say) wait for none."""
        n = len(ids)
        if start + padded > self.max_len:
            raise CospecError(f"static KV cache full: {start} + {padded} tokens > "
                              f"{self.max_len}")
        if self.fill_ids is None or len(self.fill_ids) < padded:  # once at full size where
            size = max(padded, PREFILL_GRAPH_MAX if self.use_graphs else 0)  # graphs read it
            self.fill_ids = torch.zeros(size, dtype=torch.long, device=self.device)
        staged = torch.zeros(padded + 1, dtype=torch.long)
        staged[:n], staged[padded] = torch.tensor(ids), start
        if self.use_graphs:  # from torch's pinned-memory cache, reused once the copy is done
            staged = staged.pin_memory()
        self.fill_ids[:padded].copy_(staged[:padded], non_blocking=True)
        self.fill_start.copy_(staged[padded:], non_blocking=True)
        if not self.use_graphs:
            self._layers(self.fill_ids[:padded], self.fill_start, eager=True)
            return
        if padded not in self.fills:
            self._capture_fills([padded] if start else
                                range(PREFILL_BUCKET, min(PREFILL_GRAPH_MAX, self.max_len) + 1,
                                      PREFILL_BUCKET))
        self.fills[padded].replay()

    def _capture_fills(self, lengths) -> None:
        """Capture the fill graph of each padded length in ``lengths`` not captured yet. Each
        capture's warm-up runs the layers on the staged ids and start, writing K/V into
        slots start..start + length: from slot 0 every slot that ``_fill_padded`` then leaves
        unwritten lies past its filled length (stale until overwritten), so a fill from 0
        may capture any length the cache holds; a fill from a later slot captures its own
        length only (the slots before it are live)."""
        for length in lengths:
            if length not in self.fills:
                self.fills[length] = self._capture_fill(length)

    def _capture_fill(self, padded: int) -> torch.cuda.CUDAGraph:
        """Capture the layers over ``padded`` staged tokens (eager functions: more rows than
        the fused or compiled ones take); as ``_capture``, the warm-up runs are this call."""
        t0 = time.perf_counter()
        ids, start = self.fill_ids[:padded], self.fill_start
        graph, _ = capture_graph(self.device, self.pool,
                                 lambda: self._layers(ids, start, eager=True))
        self.capture_s += time.perf_counter() - t0
        return graph

    def run_device(self, ids: torch.Tensor, start: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``run`` with the ids [n] and the start position [1] already on the device
        (computed there, never read by the host): no host data and no synchronisation, so
        the host can queue step after step. The caller keeps start + n <= max_len (the host
        cannot check a position it never reads)."""
        n = len(ids)
        if not self.use_graphs or n > MAX_GRAPH:
            return self._ungraphed(ids, start)
        self.ids[:n].copy_(ids)
        self.start.copy_(start)
        return self._replay(n)

    def _ungraphed(self, ids: torch.Tensor, start: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward without a graph (no graphs, or more than MAX_GRAPH tokens): fused or
        compiled where the engine has them for this length, else eager."""
        graphable = len(ids) <= MAX_GRAPH
        return self._forward(ids, start, eager=not (self.fused and graphable
                                                    or self.compiled_prefill and not graphable))

    def _replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n-token graph (captured on first use) replayed on the staged ids and start."""
        if n not in self.graphs:
            self.graphs[n] = self._capture(n)
        graph, logits, hidden = self.graphs[n]
        graph.replay()
        return logits, hidden

    def _capture(self, n: int) -> tuple:
        """Capture the forward over n tokens. The warm-up runs compute this very call (the
        buffers already hold its ids and start), so their K/V writes are the real ones."""
        t0 = time.perf_counter()
        graph, (logits, hidden) = capture_graph(
            self.device, self.pool, lambda: self._forward(self.ids[:n], self.start, eager=False))
        self.capture_s += time.perf_counter() - t0
        return graph, logits, hidden


def positioned_layers(engine, x: torch.Tensor, pos: torch.Tensor, kc: list[torch.Tensor],
                      vc: list[torch.Tensor], qkv: Callable, rest: Callable,
                      copies: list | None = None) -> torch.Tensor:
    """``engine``'s layers (an ``Engine`` or ``batch_lm.BatchLM`` whose layers the fused
    kernels take) over x [n, d] at positions pos [n]: layer l's K/V go to slots pos of
    kc[l], vc[l] [kv_heads, L, hd], token i attends slots <= pos[i], and q/k/v read the
    engine's rotary tables (``cos``, ``sin`` [L, hd]) at rows pos (``fused.EDGES``; 0:
    gathered first). ``qkv`` / ``rest``:
    ``fused.rms_qkv_rope`` / ``attention_mlp`` or their drop-in wrappers; ``copies``: each
    layer's int8 copies (``fused.Int8``), or None. -> [n, d]."""
    from cospec.fused import EDGES

    cos, sin = (engine.cos, engine.sin) if EDGES else (engine.cos[pos], engine.sin[pos])
    for w, w8, k, v in zip(engine.layers, copies or [None] * len(engine.layers), kc, vc):
        q, _, _ = qkv(x, cos, sin, w, engine.heads, engine.kv_heads, engine.eps,
                      cache=(k, v, pos), w8=w8, rope_table=bool(EDGES))
        x = rest(x, q, k, v, None, w, engine.scale, engine.eps, pos=pos, w8=w8)
    return x


def final_norm(engine, x: torch.Tensor, eager: bool) -> torch.Tensor:
    """The model's final RMSNorm of ``engine`` (an ``Engine`` or ``batch_lm.BatchLM``) over
    x [n, d]: one kernel (``fused.rms_norm``) where the engine runs fused layers, they take
    x and ``fused.EDGES`` is on, else ``_rms``."""
    if engine.fused and not eager:
        from cospec import fused

        if fused.EDGES and fused.rows_fit(x):
            return fused.rms_norm(x, engine.norm, engine.eps)
    return _rms(x, engine.norm, engine.eps)


def fused_runs(model: torch.nn.Module) -> bool:
    """Would the engines made for ``model`` run their few-row forwards through the fused
    layers, and so read int8 copies of its weights (``int8_weights``)? As ``fused_wanted``
    decides for an engine, from the model (COSPEC_FUSED, the device, the shapes; not the
    weights' contiguity, which only an engine's stacked weights show)."""
    from cospec import fused

    if not wanted(model) or getattr(model, "engine_class", None) is not None:
        return False
    p = next(model.parameters())
    if fused.asked(p.device) is None:
        return False
    head_norms = any(getattr(m, "q_norm", None) is not None for m in model.modules())
    return fused.unsupported_shape(p.device, p.dtype, *attention_shape(model.config),
                                   head_norms) is None


def fused_wanted(engine, flag: bool | None) -> bool:
    """Run ``engine``'s (an ``Engine`` or ``batch_lm.BatchLM``) few-row forwards through
    the fused kernels? ``fused.mode``: "1" yes, "auto" on the GPUs where they measured
    faster, "0" no; a model they cannot run keeps the reference (with a warning when they
    were asked for)."""
    from cospec import fused

    mode = fused.asked(engine.device, flag)
    if mode is None:
        return False
    why = fused.unsupported(engine)
    if why is not None and mode == "1":
        warnings.warn(f"fused layers off, reference path kept: {why}", stacklevel=3)
    return why is None


def capture_graph(device: torch.device, pool, forward: Callable[[], object],
                  warm_up: Callable[[], object] | None = None
                  ) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, ``forward``'s outputs in it): ``warm_up`` (default ``forward``) run twice on a
    side stream, so that lazy inits, compiles and allocations happen outside the capture, then
    ``forward`` captured into ``pool`` and the device synchronised."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            (warm_up or forward)()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    torch.cuda.synchronize(device)
    return graph, out


def clock(device: torch.device) -> float:
    """Seconds (``time.perf_counter``), after the device's queued work (a synchronisation on
    CUDA): the decode loops' prefill and decode timers."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compiles(device: torch.device) -> bool:
    """Is work on ``device`` compiled (``torch.compile``) by default? On CUDA, unless
    COSPEC_COMPILE=0."""
    return device.type == "cuda" and os.environ.get("COSPEC_COMPILE", "1") != "0"


def layer_functions(device: torch.device, graphs: bool | None, compile: bool | None):
    """(use CUDA graphs, compiled, qkv, rest): the two halves of a layer an engine runs, compiled
    where ``compiles``; graphs and compile default to "on CUDA"."""
    use_graphs = device.type == "cuda" if graphs is None else graphs
    if compile is None:
        compile = compiles(device)
    if not compile:
        return use_graphs, False, _qkv, _rest
    _raise_recompile_limit()
    return (use_graphs, True, torch.compile(_qkv, dynamic=True, fullgraph=True),
            torch.compile(_rest, dynamic=True, fullgraph=True))


PREFILL_MODES = ("eager", "compiled", "graphs", "all-graphs")


def prefill_mode() -> str:
    """How prefill runs (inputs of more than MAX_GRAPH tokens): COSPEC_PREFILL =
    ``all-graphs`` (unset: the default): the batch engine's ``graphs`` below, and the batch-1
    engine's prefills of up to PREFILL_GRAPH_MAX tokens as CUDA graphs too, padded to
    multiples of PREFILL_BUCKET (``Engine.fill``). On an H200 it cut the real pair's prefill
    from 22-23 ms to 5 ms a prompt (target) and spd's two from 32 to 8-9 ms, and spd's ratio
    to target-only from 1.14x to 1.17x (GSM8K) and 1.21x to 1.28x (HumanEval)
    (results/gpu/h200/prefill-graphs-batch-1). ``graphs``: the batch engine only (the
    prompts admitted together one pass, padded to a (rows, length) shape, each shape a CUDA
    graph; it cut the batch engine's prefill 1.05-4x and served 1.18-1.38x of eager's
    tokens/s at 1-16 clients: results/gpu/h200/prefill-graphs); the batch-1 engine eager.
    Where there are no graphs, CPU included: eager. ``eager``, or ``compiled`` (through the
    compiled layer halves, dynamic shapes; engines with compiled layers only: not on CPU,
    not with fused layers; it saved 8 % of a one-row prefill, nothing measurable served, and
    its compile added ~40 s to ``serve --warm-up``: results/gpu/h200/
    prefill-compiled-vs-eager)."""
    if "COSPEC_COMPILE_PREFILL" in os.environ:  # the earlier spelling: not ignored silently
        raise CospecError("COSPEC_COMPILE_PREFILL is replaced by COSPEC_PREFILL: compiled for "
                          "1, eager for 0 (or unset)")
    return choice("COSPEC_PREFILL", PREFILL_MODES, "all-graphs")


def _raise_recompile_limit() -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))


_FREE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [free Engine]


def acquire(model: torch.nn.Module, max_len: int) -> Engine:
    """A free engine of ``model`` with room for ``max_len`` tokens, made for the weights
    ``int8_weights`` now asks for (a new one if none: one made before the int8 copies were
    asked for would read the model's own weights)."""
    free = _FREE.setdefault(model, [])
    for eng in free:
        if eng.max_len >= max_len and eng.int8_asked == has_int8(model):
            free.remove(eng)
            return eng
    free.clear()  # too small or for the other weights: let them go, a new one replaces them
    engine_class = getattr(model, "engine_class", None) or Engine  # a TP shard names its own
    return engine_class(model, -(-max_len // LEN_ROUND) * LEN_ROUND)


def _release(model_ref: weakref.ref, engine: Engine) -> None:
    model = model_ref()
    if model is not None:
        _FREE.setdefault(model, []).append(engine)


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of ``t`` started now, behind the work queued so far: (pinned buffer,
    event that completes with the copy) on CUDA, (a clone, None) on the CPU. The buffer
    comes from torch's pinned-memory cache, reused only once its copy is done."""
    if t.device.type != "cuda":
        return t.clone(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))  # the copy's stream, on t's device
    return host, done


def capture_seconds() -> float:
    """Seconds the pooled engines of every model have spent capturing graphs (and compiling
    for them): a speed run reads it around a timed generation to know whether a capture
    fell inside it."""
    return sum(e.capture_s for free in list(_FREE.values()) for e in free)


def engines(model: torch.nn.Module) -> list[Engine]:
    """The free (pooled) engines of ``model``: for reporting capture time."""
    return list(_FREE.get(model, []))


class StaticLM:
    """``CachedLM``'s interface over a pooled ``Engine``; ``length`` = tokens in the cache
    (slots 0..length-1 hold them; slots beyond are stale and invisible)."""

    def __init__(self, model: torch.nn.Module, hidden: bool = False, max_len: int = 2048):
        self.engine = acquire(model, max_len)
        self.hidden, self.device = hidden, self.engine.device
        self.length = 0
        weakref.finalize(self, _release, weakref.ref(model), self.engine)

    def forward(self, ids: list[int] | torch.Tensor, keep: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ``ids`` (a list or a 1-d device tensor) after the cached prefix; returns the
        last ``keep`` rows of logits [keep, V] (float32, a copy) and, if ``hidden``, of last
        hidden states [keep, d]."""
        logits, h = self.engine.run(ids, self.length)
        self.length += len(ids)
        out = logits[-keep:].to(torch.float32, copy=True)
        return out, h[-keep:].to(torch.float32, copy=True) if self.hidden else None

    def prefill(self, ids: list[int]) -> None:
        """Feed ``ids`` after the cached prefix for their K/V only (``Engine.fill``)."""
        if ids:
            self.engine.fill(ids, self.length)
            self.length += len(ids)

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget tokens beyond ``length``: O(1), their slots are overwritten later."""
        self.length = min(self.length, length)


def side_by_side(a, b, ids: list[int], start: int, steps: int, verify: int, reject: int,
                 every: int):
    """Drive two caches (a ``StaticLM`` and a reference such as ``CachedLM``) through one
    schedule and yield their logits, ([n, V], [n, V]), step by step: both prefilled with
    ``ids[:start]``, then one token per step except every ``every``-th step (the first
    included), a verify of ``verify`` tokens whose last ``reject`` are rolled back. For
    checking the fast path's arithmetic and cache bookkeeping."""
    a.prefill(ids[:start])
    b.prefill(ids[:start])
    pos = start
    for step in range(steps):
        n = verify if step % every == 0 else 1
        yield a.forward(ids[pos:pos + n], keep=n)[0], b.forward(ids[pos:pos + n], keep=n)[0]
        pos += n - (reject if step % every == 0 else 0)
        a.crop(pos)
        b.crop(pos)
