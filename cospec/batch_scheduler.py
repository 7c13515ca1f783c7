"""Continuous batching for ``cospec serve``: live requests decode together in
``fast_batch.BatchEngine`` sub-batches, each engine for one (method, k).

Terms: a *slot* is one row of an engine's static KV caches, ``max_context`` positions of
every model the method runs. The pool owns at most ``max_batch`` slots in all:

- A request can be batched when the engine runs its method (``batch_methods``: target-only,
  speculative, arbiter-decided, and the speculative CoS combinations ``cos-*`` / ``*-sd``
  with their middle models; not ``we`` / ``cd``), every model it runs is one the fast path
  supports, and its k fits the engine. Rows of one engine share method and k; temperature,
  top-p, top-k and seed are per row.
- ``plan`` reserves a slot (on the event loop, between turns): in an engine of the
  request's (method, k) with a free row, else in a new engine of the slots no other engine
  holds (engines with no live request are given up first), shared with the other (method,
  k) waiting in the queue: alone it takes them all, with three others a quarter. A request
  that finds no slot waits (the scheduler keeps the queue first come, first served); as
  engines drain, the slots go where the queue needs them.
- Speculation off under load (``spec_off_at``, default SPEC_OFF_AT): a request of a method
  whose output is the target's (``SPEC_OFF_METHODS``: spd, prompt lookup) planned while at
  least ``spec_off_at`` - 1 others decode in the engines runs target-only instead, since
  batched spd measured slower than target-only from 4 rows on: on a GPU (H200, the shipped
  pair, one machine, before the verifies ran fused: 0.87x / 0.60x / 0.86x at 4 / 16 / 64
  rows against 1.04x at 1, results/gpu/h200/batch-real-pair) and on a 2-core CPU (k = 4:
  0.88x at 4 rows, 1.15x at 1; results/cpu/batch-spd-vs-target), and so is batched prompt
  lookup, on that CPU (0.83x at 4 rows, 1.20x at 1; results/cpu/batch-lookup-epyc) and on a
  GPU (H100, the shipped pair: 0.84x / 0.76x / 0.70x at 4 / 8 / 16 rows, where spd made
  1.05x / 0.97x / 0.84x; results/gpu/h100/batch-rows-cap-real-pair). Below it, at 2 and 3
  rows, their verifies run the fused layers on a GPU, where spd made 1.36x / 1.33x
  target-only and prompt lookup 1.39x (H100, results/gpu/h100/fused-verify-rows-real-pair).
  With 4-row verifies fused too (``fused.ROWS_TOKENS`` 64) spd made 1.16x at 4 rows, lookup
  1.00x: on a GPU ``spec_off_at`` 5 may serve spd better (not yet measured served). Its
  output is what the method would give: the target's greedy tokens, or a sample from the
  target's distribution (a seeded sampled request keeps its method, so that its seed gives
  the same tokens under any load). Its metrics say ``speculation_off``. Other methods with a
  draft (cospec, CoS) change what they decode, so they keep it. Every engine must go
  target-only together: a turn steps each engine once, so a few rows left speculating hold
  every target-only row to one step per spd block (results/gpu/h200/serve-spec-off-at).
  Hence (spd stands for either method):

  - below the load, such spd requests share one spd engine of ``spec_off_at`` - 1 rows
    *beside* the ``max_batch`` slots (``Group.extra``; the server's memory check counts
    them), so that the target-only engine can hold every slot;
  - under load, an spd request that finds no free target-only row waits for one rather
    than speculate;
  - once the load is reached, the spd requests already decoding move to the target-only
    engine at the next turn and go on from the tokens they committed
    (``BatchPool._switch_running``);
  - the load holds for ``SPEC_OFF_HOLD_S`` after it was last seen (``BatchPool.spec_off_hold``):
    requests of equal length end in one turn, and their clients' next requests arrive one by
    one, the first few below the load. Without the hold they started in spd's engine, to be
    prefilled again in the target-only one a turn later, and each such turn stepped both
    engines: on a 2-core CPU at 4 clients 43 to 67 of 96 spd requests went that way, with
    it 1 (results/cpu/serve-spec-off-hold).
- ``warm`` (``cospec serve --warm-up``), before any request: the engine of the default
  (method, k) over every slot, its CUDA graphs captured (``fast_batch_warm``).
- ``turn`` (on the worker thread) releases the rows of requests that ended (stop string,
  EOS, timeout, cancellation: the slot is free before the next step), prefills the planned
  ones, steps every non-empty engine once and returns what each request committed.
- Engines end a row at its request's EOS ids (its own: ``ignore_eos`` rows share the engine)
  or ``max_tokens``; stop strings and the time limit are the scheduler's, which ends the
  request and lets the next ``turn`` release its row.

Per-request metrics: a request's steps, drafted, accepted, arbiter calls and overrides are
its own rows' counts; its prefill time is that of the step it joined an engine in (a moved
request's second prefill included), its decode time the rest of every step it took part in.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from cospec.batch_lm import PREFILL_TOKENS
from cospec.batch_methods import engine_options, proposes
from cospec.errors import CospecError
from cospec.fast import attention_shape
from cospec.fast_batch import RUN_AHEAD, BatchEngine, Commit
from cospec.fast_batch_warm import WarmUp, warm_up
from cospec.job import Job
from cospec.methods import Method

log = logging.getLogger("cospec.server")

COUNTERS = ("steps", "drafted", "accepted", "arbiter_calls", "overrides")
SPEC_OFF_AT = 4  # ``spec_off_at``'s default: the rows at which batched spd measured slower
                 # than target-only, on an H200 and on a 2-core CPU (prompt lookup on that
                 # CPU and on an H100)
SPEC_OFF_METHODS = ("spd", "lookup")  # speculating batch methods whose output is the target's
SPEC_OFF_HOLD_S = 1.0  # seconds the load holds after it was last seen: longer than a client's
                      # turn-around between two requests, short beside a lone client's stream
MAX_K = 2 * RUN_AHEAD - 1  # the longest draft an engine runs


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
        self.jobs: dict[int, Job] = {}
        self.joining: set[int] = set()  # requests submitted whose prefill no commit has shown

    def add(self, job: Job, done: Sequence[int] = ()) -> int:
        """Submit ``job``; ``done``: tokens it already committed elsewhere, which its row
        continues after (prefilled with the prompt, within what is left of its budget)."""
        seed = job.seed if job.seed is not None else random.getrandbits(32)
        rid = self.submit([*job.prompt_ids, *done], job.max_tokens - len(done), job.sampling,
                          seed)
        self.jobs[rid] = job
        self.joining.add(rid)
        return rid

    def committed(self, rid: int) -> list[int]:
        """The tokens request ``rid`` has committed so far (none while it is queued)."""
        return next((list(r.tokens) for r in self.slots if r is not None and r.rid == rid), [])

    def cancel(self, rid: int) -> None:
        """Forget request ``rid``: out of the queue, or its slot freed now."""
        self.joining.discard(rid)
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
    """The sub-batch of a request: (method name, k; 0 without proposals), or None when no
    batch engine can decode it (``batch_methods.engine_options``)."""
    if engine_options(method) is None:
        return None
    if proposes(method) and not 1 <= k <= MAX_K:
        return None
    return method.name, k if proposes(method) else 0


def reserve(method: Method, k: int) -> int:
    """Positions a slot keeps beyond prompt + max_tokens (``BatchEngine.submit``'s margin:
    the last step may write k drafts, or ``RUN_AHEAD`` tokens, past the budget)."""
    return (k if proposes(method) else RUN_AHEAD) + 2


def spec_rows(max_batch: int, spec_off_at: int) -> int:
    """The rows of a speculating engine (spd's, prompt lookup's) beside the ``max_batch``
    slots while speculation goes off at ``spec_off_at`` requests: spec_off_at - 1, at least
    1, at most max_batch."""
    return min(max_batch, max(1, spec_off_at - 1))


def kv_bytes(models: Iterable[torch.nn.Module], rows: int, max_len: int) -> int:
    """Bytes of K and V caches of ``rows`` x ``max_len`` positions in every model."""
    per = 0
    for m in models:
        cfg = m.config
        _, kv, hd = attention_shape(cfg)
        per += 2 * cfg.num_hidden_layers * kv * hd * next(m.parameters()).element_size()
    return per * rows * max_len


def prefill_bytes(models: Iterable[torch.nn.Module], max_len: int) -> int:
    """Bytes the largest prefill pass of a batch engine needs beyond the caches, in the
    widest of ``models`` (one model's pass at a time). A pass holds at most PREFILL_TOKENS
    padded tokens, or one prompt of up to ``max_len`` (``batch_lm.BatchLM.prefill``), each
    attending over at most ``max_len`` positions: its attention scores [tokens, heads, span]
    are held as scores, masked scores and probabilities in the model's dtype and as float32
    softmax; its MLP holds [tokens, 3 x intermediate]. The larger of the two counts: a
    graph-replayed prefill keeps that much in its pool, an eager one needs it free."""
    tokens, most = max(PREFILL_TOKENS, max_len), 0
    for m in models:
        cfg, size = m.config, next(m.parameters()).element_size()
        attention = tokens * cfg.num_attention_heads * max_len * (3 * size + 4)
        mlp = tokens * 3 * (getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size) * size
        most = max(most, attention, mlp)
    return most


def check_memory(models: list[torch.nn.Module], rows: int, max_len: int, extra: int = 0
                 ) -> tuple[int, int]:
    """(KV bytes, prefill bytes): the KV budget of ``rows`` + ``extra`` (spd's or prompt
    lookup's rows beside the slots, ``Group.extra``) x ``max_len`` positions and the
    largest prefill pass's (``prefill_bytes``). CospecError when together they exceed 90 %
    of the memory free now on the models' device (so that a full server never runs out of
    memory mid-request)."""
    kv, prefill = kv_bytes(models, rows + extra, max_len), prefill_bytes(models, max_len)
    device = next(models[0].parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_ram()
        if free is None:
            return kv, prefill
    if kv + prefill > 0.9 * free:
        beside = f" (+ {extra} rows of a speculating engine, --spec-off-at)" if extra else ""
        raise CospecError(f"--max-batch {rows}{beside} x --max-context {max_len} needs "
                          f"{kv / 2**30:.2f} GiB of KV cache and {prefill / 2**30:.2f} GiB for "
                          f"a prefill pass, but {free / 2**30:.2f} GiB is free on {device}: "
                          "lower --max-batch or --max-context")
    return kv, prefill


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


@dataclass(eq=False)
class Group:
    """One engine's slots: its (method, k), the method its engine runs, its size, the engine
    (built at its first turn) and the requests holding its slots (request id in the engine;
    None until submitted)."""

    key: tuple[str, int]
    method: Method
    size: int
    engine: ServedEngine | None = None
    jobs: dict[Job, int | None] = field(default_factory=dict)
    extra: bool = False  # spd's (or prompt lookup's) few rows while speculation goes off
                         # under load: beside the max_batch slots the other engines share
                         # (``BatchPool.plan``; one such engine live at a time)

    def live(self) -> int:
        return sum(1 for j in list(self.jobs) if not (j.done or j.cancelled))


@dataclass
class BatchPool:
    """Engines (``Group``s) within ``max_batch`` slots of ``max_context`` positions."""

    max_batch: int
    max_context: int
    groups: list[Group] = field(default_factory=list)
    step_s: float = 0.0  # seconds spent in the engines' steps (admission prefill included)
    spec_off_at: int = 0  # spd and prompt lookup run target-only when this many would
                          # decode (0: never)
    target: Method | None = None  # the target-only method they fall back to
    switched: int = 0  # spd and lookup requests planned target-only under load
    spec_off_hold: float = SPEC_OFF_HOLD_S  # the load holds this long after it was seen
    clock: Callable[[], float] = time.monotonic
    loaded_at: float = float("-inf")  # when spec_off_at requests were last seen live

    # --- on the event loop, between turns (the readers are safe during a turn too)

    def live(self) -> int:
        """Requests holding (or about to hold) a slot."""
        return sum(g.live() for g in list(self.groups))

    def jobs(self) -> list[Job]:
        return [j for g in list(self.groups) for j in list(g.jobs)]

    @property
    def busy(self) -> bool:
        return any(g.jobs for g in self.groups)

    def plan(self, job: Job, key: tuple[str, int],
             waiting: Iterable[tuple[str, int]] = ()) -> bool:
        """Reserve a slot for ``job`` (False: none free now; never more than max_batch
        requests live). The largest engine of its (method, k) with a free row takes it; else
        a new engine gets the free slots (engines with no live request given up first),
        shared with the other (method, k) in the queue (``waiting``) that find no free row
        either. Under load an spd or lookup request that could run target-only is planned
        there (``speculation_off``; the module docstring) or waits for a target-only row;
        below it, such requests share one engine of ``spec_off_at`` - 1 rows beside the
        shared slots (``Group.extra``), so that the target-only engine can hold every
        slot."""
        if self.live() >= self.max_batch:
            return False
        # the queue's spd and lookup requests that can go target-only want its slots, if any
        waiting = {engine_key(self.target, 0) if self._spec_off(w) else w for w in waiting}
        switchable = self._switchable(job, key)
        if switchable and self._loaded(self.live() + 1):  # under load: target-only
            placed = self._target_only(job, waiting) is not None
        else:
            cap = self._spec_slots(key) if switchable else self.max_batch
            placed = self._place(job, key, job.method, waiting, cap, extra=switchable) is not None
        self._loaded(self.live())  # noted for the hold
        return placed

    def _loaded(self, live: int) -> bool:
        """Whether the pool is under load with ``live`` requests: spec_off_at or more of them
        now (0: never; the time is noted in ``loaded_at``), or within the last
        ``spec_off_hold`` seconds."""
        now = self.clock()
        if self.spec_off_at and live >= self.spec_off_at:
            self.loaded_at = now
            return True
        return now - self.loaded_at < self.spec_off_hold

    def _place(self, job: Job, key: tuple[str, int], method: Method,
               waiting: Iterable[tuple[str, int]], cap: int, extra: bool = False
               ) -> Group | None:
        """``plan``'s slot for ``job`` in an engine of ``key`` running ``method`` (its group;
        None: no slot free); a new engine takes at most ``cap`` slots. ``extra``: a new
        engine is spd's (or lookup's) few rows beside the shared slots (``Group.extra``)
        unless another such engine has live requests."""
        fits = [g for g in self.groups if g.key == key and g.live() < g.size]
        if fits:
            group = max(fits, key=lambda g: g.size)
        elif extra and not any(g.extra and g.live() for g in self.groups):
            self.groups = [g for g in self.groups if not g.extra]  # an idle one, of another k
            group = Group(key, method, cap, extra=True)
            self.groups.append(group)
        else:
            self.groups = [g for g in self.groups if g.live()]
            free = self.max_batch - sum(g.size for g in self.groups if not g.extra)
            if free < 1:
                return None
            roomy = {g.key for g in self.groups if g.live() < g.size}
            size = max(1, free // len({key, *waiting} - roomy))
            group = Group(key, method, min(size, cap))
            self.groups.append(group)
        group.jobs[job] = None
        return group

    def _spec_off(self, key: tuple[str, int]) -> bool:
        """Speculation goes off under load for engine ``key``: one of ``SPEC_OFF_METHODS``
        (spd, prompt lookup), spec_off_at > 0."""
        return key[0] in SPEC_OFF_METHODS and self.spec_off_at > 0 and self.target is not None

    def _spec_slots(self, key: tuple[str, int]) -> int:
        """The slots a new engine of ``key`` takes at most for requests that could run
        target-only: spec_off_at - 1 (at least 1, at most max_batch) under ``_spec_off``,
        else every slot."""
        if self._spec_off(key):
            return spec_rows(self.max_batch, self.spec_off_at)
        return self.max_batch

    def _switchable(self, job: Job, key: tuple[str, int]) -> bool:
        """``job`` (of engine ``key``) would run target-only under load: an spd or lookup
        request, greedy or unseeded (a seed gives the same tokens under any load), that fits
        a target-only slot, while speculation goes off under load (``_spec_off``)."""
        return (self._spec_off(key) and (job.sampling.greedy or job.seed is None)
                and len(job.prompt_ids) + job.max_tokens + reserve(self.target, 0)
                <= self.max_context)

    def warm(self, method: Method, k: int, progress: bool = True
             ) -> list[tuple[Group, WarmUp]]:
        """Before any request: build the engine of (``method``, ``k``) over all
        ``max_batch`` slots and capture its CUDA graphs (``fast_batch_warm.warm_up``); its
        requests take those slots as ``plan`` finds them. spd or lookup while speculation
        goes off under load: its engine over spec_off_at - 1 rows of its own and the
        target-only engine over every slot, both warmed. Each engine's group and what its
        capture did, in that order; empty when no batch engine runs the method. The engines
        are given up, as any idle one, when another (method, k) needs the slots; the engines
        built then capture as they go."""
        key = engine_key(method, k)
        if key is None:
            return []
        parts = [(key, method, self.max_batch, False)]
        if self._spec_off(key):
            parts = [(key, method, self._spec_slots(key), True),
                     (engine_key(self.target, 0), self.target, self.max_batch, False)]
        done = []
        for *part, extra in parts:
            group = Group(*part, extra=extra)
            group.engine = self._build(group)
            done.append((group, warm_up(group.engine, progress)))
            self.groups.append(group)
        return done

    def clear(self) -> None:
        """Drop every engine (after a failed step: their state is unknown)."""
        self.groups.clear()

    def slots_in_use(self) -> dict[str, int]:
        """Occupied slots per (method, k), as the engines see them (for ``/health``)."""
        out: dict[str, int] = {}
        for g in list(self.groups):
            name = f"{g.key[0]}/k={g.key[1]}" if g.key[1] else g.key[0]
            used = sum(r is not None for r in list(g.engine.slots)) if g.engine else 0
            out[name] = out.get(name, 0) + used
        return out

    # --- on the worker thread

    def turn(self, early: Callable[[list[tuple[Job, Served]]], None] | None = None
             ) -> list[tuple[Job, Served]]:
        """Release ended requests' rows, start the planned ones, step every non-empty
        engine once; returns each request's commit. ``early`` (when given) gets the first
        token of the requests that start in a step as soon as the device has it, before the
        step ends (``BatchEngine.step``); their commits in the return value hold the rest."""
        out = []
        self._switch_running()
        for g in list(self.groups):
            for job, rid in list(g.jobs.items()):
                if job.done or job.cancelled:
                    del g.jobs[job]
                    if rid is not None:
                        g.engine.cancel(rid)
                elif rid is None:
                    g.engine = g.engine or self._build(g)
                    try:  # continuing after what it committed alone, if it started so
                        g.jobs[job] = g.engine.add(job, job.ids)
                    except CospecError:  # refused (the server checks first): it alone fails
                        log.exception("a batch engine refused a request")
                        del g.jobs[job]
                        out.append((job, Served(-1, [], True)))
        for g in list(self.groups):
            engine = g.engine
            if engine is None or not engine.busy:
                continue
            out += self._step(g, early)
        return out

    def _switch_running(self) -> None:
        """Under load (``spec_off_at`` requests or more live) the switchable spd and lookup
        requests already in their engines go target-only too, where a target-only row is free: each
        continues from the tokens it has committed (its prompt and those prefilled again in
        the target-only engine, within what is left of its budget), so its output is still
        the target's. A turn steps every engine once, so a few rows left speculating held
        every target-only row to one step per spd block: on an H200 with 64 clients, 1,849
        tokens/s against 6,354 with target-only requests alone
        (results/gpu/h200/serve-spec-off-at)."""
        if self.target is None or not self.spec_off_at or self.live() < self.spec_off_at:
            return
        self._loaded(self.live())  # noted for the hold
        for g in list(self.groups):
            if not self._spec_off(g.key):
                continue
            for job, rid in list(g.jobs.items()):
                if job.done or job.cancelled or not self._switchable(job, g.key):
                    continue
                to = self._target_only(job)
                if to is None:
                    return  # no target-only row free: the rest stay for now
                del g.jobs[job]
                if rid is not None:
                    done = g.engine.committed(rid)
                    g.engine.cancel(rid)
                    to.engine = to.engine or self._build(to)
                    to.jobs[job] = to.engine.add(job, done)

    def _target_only(self, job: Job, waiting: Iterable[tuple[str, int]] = ()
                     ) -> Group | None:
        """Place spd or lookup request ``job`` in the target-only engine (``_place``),
        counted as ``speculation_off``; None (nothing counted) when no row is free."""
        group = self._place(job, engine_key(self.target, 0), self.target, waiting,
                            self.max_batch)
        job.speculation_off = group is not None
        self.switched += job.speculation_off
        return group

    def _step(self, g: Group, early: Callable[[list[tuple[Job, Served]]], None] | None
              ) -> list[tuple[Job, Served]]:
        """One step of ``g``'s engine, its commits settled (``_settle``); ``early`` as in
        ``turn``."""
        engine = g.engine
        t0, p0 = time.perf_counter(), engine.stats.prefill_s
        firsts: dict[int, float] = {}  # request -> the decode time to its first token

        def first(commits: list[Served]) -> None:
            prefill = engine.stats.prefill_s - p0
            decode = time.perf_counter() - t0 - prefill
            firsts.update((c.rid, decode) for c in commits)
            early([self._settle(g, c, prefill, decode) for c in commits])

        commits = engine.step(first if early is not None else None)
        took = time.perf_counter() - t0
        self.step_s += took
        prefill = engine.stats.prefill_s - p0
        return [self._settle(g, c, prefill, took - prefill, firsts.get(c.rid))
                for c in commits]

    @staticmethod
    def _settle(g: Group, c: Served, prefill: float, decode: float,
                decoded: float | None = None) -> tuple[Job, Served]:
        """(job, commit) of one commit of group ``g``'s engine, with the job's prefill
        (``prefill``: in its first step in this engine, a moved request's prefill again
        included) and decode times added, and the job let go when it is done. ``decoded``:
        the decode time its first token already counted."""
        engine = g.engine
        job = engine.jobs[c.rid]
        if c.rid in engine.joining:  # its first step here: prefilled in it
            engine.joining.discard(c.rid)
            job.stats.prefill_s += prefill
        job.stats.decode_s += decode - (decoded or 0.0)
        if c.done:
            g.jobs.pop(job, None)
            engine.jobs.pop(c.rid, None)
        return job, c

    def _build(self, group: Group) -> ServedEngine:
        method = group.method
        return ServedEngine(method.verifier, method.proposer, k=max(group.key[1], 1),
                            rows=group.size, max_len=self.max_context,
                            **engine_options(method))
