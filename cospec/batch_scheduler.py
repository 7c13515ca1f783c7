"""Continuous batching for ``cospec serve``: live requests decode together in
``fast_batch.BatchEngine`` sub-batches, one engine per (method, k).

Terms: a *slot* is one row of an engine's static KV caches, ``max_context`` positions of
every model the method runs. The pool owns at most ``max_batch`` slots in all:

- A request can be batched when its method is target-only, speculative or arbiter-decided
  (``ExactRule`` / ``ArbiterRule``, not the CoS combinations), every model it runs is one the
  fast path supports, and its k fits the engine. Rows of one engine share method and k;
  temperature, top-p, top-k and seed are per row.
- ``plan`` reserves a slot (on the event loop, between turns): in the engine of the
  request's (method, k) if it has a free row, else in a new engine of every slot no other
  engine holds; engines with no live request are dropped to free their slots for it. A
  request that finds no slot waits (the scheduler keeps the queue first come, first served).
- ``turn`` (on the worker thread) releases the rows of requests that ended (stop string,
  EOS, timeout, cancellation: the slot is free before the next step), prefills the planned
  ones, steps every non-empty engine once and returns what each request committed.
- Engines end a row at its request's EOS ids (its own: ``ignore_eos`` rows share the engine)
  or ``max_tokens``; stop strings and the time limit are the scheduler's, which ends the
  request and lets the next ``turn`` release its row.

Per-request metrics: a request's steps, drafted, accepted, arbiter calls and overrides are
its own rows' counts; its prefill time is that of the step it joined in, its decode time
the rest of every step it took part in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cospec.acceptance import ExactRule
from cospec.arbiter import ArbiterRule
from cospec.errors import CospecError
from cospec.fast import supported
from cospec.fast_batch import RUN_AHEAD, BatchEngine, Commit
from cospec.methods import Method
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats

COUNTERS = ("steps", "drafted", "accepted", "arbiter_calls", "overrides")
MAX_K = 2 * RUN_AHEAD - 1  # the longest draft an engine runs


class BatchJob(Protocol):
    """What the pool reads of a request (``scheduler.Job``)."""

    method: Method
    prompt_ids: list[int]
    max_tokens: int
    k: int
    sampling: SamplingConfig
    seed: int | None
    eos: tuple[int, ...]
    stats: DecodeStats
    cancelled: bool

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True)
class Served(Commit):
    """A ``Commit`` with, per token, whether it came from the draft."""

    from_draft: tuple[bool, ...] = ()


class ServedEngine(BatchEngine):
    """A ``BatchEngine`` whose rows end at their own requests' EOS ids, that counts each
    request's steps in its own ``DecodeStats`` (``stats`` keeps the sums) and can drop a
    request at once (``cancel``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.jobs: dict[int, BatchJob] = {}

    def add(self, job: BatchJob) -> int:
        seed = job.seed if job.seed is not None else random.getrandbits(32)
        rid = self.submit(job.prompt_ids, job.max_tokens, job.sampling, seed)
        self.jobs[rid] = job
        return rid

    def cancel(self, rid: int) -> None:
        """Forget request ``rid``: out of the queue, or its slot freed now."""
        if self.jobs.pop(rid, None) is None:
            return
        self.queue = type(self.queue)(r for r in self.queue if r.rid != rid)
        for slot, req in enumerate(self.slots):
            if req is not None and req.rid == rid:
                self._free(slot)

    def _commit(self, slot: int, row: list[int]) -> Served:
        req = self.slots[slot]
        job = self.jobs[req.rid]
        self.eos = set(job.eos)  # read by this row's commit only
        before = [getattr(self.stats, n) for n in COUNTERS]
        c = super()._commit(slot, row)
        mine = job.stats
        for name, b in zip(COUNTERS, before):
            setattr(mine, name, getattr(mine, name) + getattr(self.stats, name) - b)
        flags = tuple(req.from_draft[len(req.from_draft) - len(c.tokens):])
        return Served(c.rid, c.tokens, c.done, flags)


def engine_key(method: Method, k: int) -> tuple[str, int] | None:
    """The sub-batch of a request: (method name, k; 0 without a draft), or None when no
    batch engine can decode it."""
    if method.combo is not None or not isinstance(method.rule, (ExactRule, ArbiterRule)):
        return None
    models = [m for m in (method.verifier, method.proposer) if m is not None]
    if not all(supported(m) and getattr(m, "engine_class", None) is None for m in models):
        return None
    if method.proposer is not None and not 1 <= k <= MAX_K:
        return None
    return method.name, k if method.proposer is not None else 0


def reserve(method: Method, k: int) -> int:
    """Positions a slot keeps beyond prompt + max_tokens (``BatchEngine.submit``'s margin:
    the last step may write k drafts, or ``RUN_AHEAD`` tokens, past the budget)."""
    return (k if method.proposer is not None else RUN_AHEAD) + 2


def kv_bytes(models: Iterable[torch.nn.Module], rows: int, max_len: int) -> int:
    """Bytes of K and V caches of ``rows`` x ``max_len`` positions in every model."""
    per = 0
    for m in models:
        cfg = m.config
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per += 2 * cfg.num_hidden_layers * kv * hd * next(m.parameters()).element_size()
    return per * rows * max_len


def check_memory(models: list[torch.nn.Module], rows: int, max_len: int) -> int:
    """The KV budget in bytes; CospecError when it exceeds 90 % of the memory free now on
    the models' device (so that a full server never runs out of memory mid-request)."""
    need = kv_bytes(models, rows, max_len)
    device = next(models[0].parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_ram()
        if free is None:
            return need
    if need > 0.9 * free:
        raise CospecError(f"--max-batch {rows} x --max-context {max_len} needs "
                          f"{need / 2**30:.2f} GiB of KV cache but {free / 2**30:.2f} GiB is "
                          f"free on {device}: lower --max-batch or --max-context")
    return need


def available_ram() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class Row:
    key: tuple[str, int]
    engine: ServedEngine
    rid: int


@dataclass
class BatchPool:
    """The engines of every (method, k) sub-batch within ``max_batch`` slots of
    ``max_context`` positions."""

    max_batch: int
    max_context: int
    sizes: dict[tuple[str, int], int] = field(default_factory=dict)      # key -> rows
    engines: dict[tuple[str, int], ServedEngine] = field(default_factory=dict)
    rows: dict[BatchJob, Row] = field(default_factory=dict)
    pending: list[tuple[BatchJob, tuple[str, int]]] = field(default_factory=list)

    # --- on the event loop, between turns

    def live(self, key: tuple[str, int] | None = None) -> int:
        """Requests holding (or about to hold) a slot, of one sub-batch or of all (safe to
        call during a turn: it reads copies, each taken at once)."""
        jobs = [*((j, r.key) for j, r in list(self.rows.items())), *list(self.pending)]
        return sum(1 for j, k in jobs if (key is None or k == key)
                   and not (j.done or j.cancelled))

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    def plan(self, job: BatchJob, key: tuple[str, int]) -> bool:
        """Reserve a slot for ``job`` in its sub-batch (False: none free now)."""
        if key not in self.sizes:
            free = self.max_batch - sum(self.sizes.values())
            if free < 1:
                for idle in [k for k in self.sizes if self.live(k) == 0]:
                    self._drop(idle)
                free = self.max_batch - sum(self.sizes.values())
            if free < 1:
                return False
            self.sizes[key] = free
        elif self.live(key) >= self.sizes[key]:
            return False
        self.pending.append((job, key))
        return True

    def _drop(self, key: tuple[str, int]) -> None:
        del self.sizes[key]
        self.engines.pop(key, None)
        for job in [j for j, r in self.rows.items() if r.key == key]:
            del self.rows[job]

    def clear(self) -> None:
        """Drop every engine (after a failed step: their state is unknown)."""
        self.sizes.clear()
        self.engines.clear()
        self.rows.clear()
        self.pending.clear()

    def slots_in_use(self) -> dict[str, int]:
        """Occupied slots per sub-batch, as the engines see them (for ``/health``)."""
        return {f"{name}/k={k}" if k else name: sum(r is not None for r in list(e.slots))
                for (name, k), e in list(self.engines.items())}

    # --- on the worker thread

    def turn(self) -> list[tuple[BatchJob, Served]]:
        """Release ended requests' rows, start the planned ones, step every non-empty
        engine once; returns each request's commit."""
        for job in [j for j in self.rows if j.done or j.cancelled]:
            row = self.rows.pop(job)
            row.engine.cancel(row.rid)
        for job, key in self.pending:
            if job.done or job.cancelled:
                continue
            engine = self.engines.get(key) or self._build(job.method, key)
            self.rows[job] = Row(key, engine, engine.add(job))
        self.pending.clear()
        out = []
        for engine in list(self.engines.values()):
            if not engine.busy:
                continue
            t0, p0 = time.perf_counter(), engine.stats.prefill_s
            commits = engine.step()
            prefill = engine.stats.prefill_s - p0
            decode = time.perf_counter() - t0 - prefill
            for c in commits:
                job = engine.jobs[c.rid]
                if not job.stats.decode_s:  # its first step: it was prefilled in this one
                    job.stats.prefill_s += prefill
                job.stats.decode_s += decode
                if c.done:
                    self.rows.pop(job, None)
                    engine.jobs.pop(c.rid, None)
                out.append((job, c))
        return out

    def _build(self, method: Method, key: tuple[str, int]) -> ServedEngine:
        rule = method.rule
        kw = {}
        if isinstance(rule, ArbiterRule):
            kw = dict(policy=rule.policy, threshold=rule.threshold,
                      max_overrides=rule.max_overrides, every_mismatch=rule.every_mismatch)
        engine = ServedEngine(method.verifier, method.proposer, k=max(key[1], 1),
                              rows=self.sizes[key], max_len=self.max_context, **kw)
        self.engines[key] = engine
        return engine
