"""The scheduler of ``cospec serve``: a request queue, continuous batching or round-robin
stepping of the live generations on one worker thread, and the limits (queue size, time
limit, cancellation).

One worker thread owns the models. Prompts are encoded on a thread of their own, with a copy
of the tokenizer, so that a request arriving mid-step is encoded while the step runs and
joins at the next one. A scheduler task admits requests first come, first served
(each path keeps its own order). A request a batch engine can decode (``Job.batch``: see
``cospec.batch_scheduler``) takes a slot of ``BatchPool``: each turn steps every non-empty
engine once, so all batched requests advance together, joining at the next step and leaving
when done. Any other request (``we`` / ``cd``, models the fast path does not run) is one
of at most ``max_active`` generations stepped round robin, one committed token per turn
(the tokens of one speculative block come out of one forward pass, so a turn is cheap
after the first of a block). A long request
therefore never holds a short one back for its whole duration. Between turns it drops a
request whose client went away (``cancel``): its slot is free before the next step. The
worker never waits on a client and a handler only waits for its own tokens, so a slow reader
delays nobody but itself. At most ``max_batch + max_active + max_queue`` requests are
admitted; beyond that a request gets a 429 at once.

Alone (``solo``): a batchable request that finds nothing else decoding or waiting, of a
method whose batch-1 loop runs each block on the device (greedy spd, cospec, cos-we; spd
and cos-we sampled without a seed: ``Method.device_block``), decodes on that path, round
robin, since a batch engine's one row is slower: on the real pair on an H200 a lone client
got 352 tok/s from the spd batch engine against 404 target-only
(results/gpu/h200/serve-spec-off-at), where the device-side block runs 1.2-1.3x
target-only at batch 1. A method of ``alone`` decodes it there instead of its own: the
server gives an spd request spd-staged's blocks (the same tokens at T = 0, the same
distribution sampled; the metrics keep the name spd), 7-35 % faster than spd's on an H100
(docs/methods.md). When another request arrives it moves to the pool at the next turn
and goes on from the tokens it committed (prefilled again there), as a request moved under
load does; its tokens at T = 0 are the same either way (sampled, a sample of the same
distribution either way).

Time limit: ``timeout`` seconds from arrival, queueing included. A request that reaches it
ends as if it had reached max_tokens — finish_reason ``"length"`` — with
``metrics.timed_out`` true (and no text if it never started).

Text: ``cospec.text_stream`` (incremental detokenization, stop strings in the new text only).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from cospec.batch_scheduler import BatchPool, Served
from cospec.decoding import Token
from cospec.job import Job
from cospec.methods import Method, eos_ids
from cospec.models import Pair
from cospec.server_schemas import ApiError
from cospec.text_stream import TextStream, stop_at

log = logging.getLogger("cospec.server")


class Engine:
    """The queue, the batch pool, the round-robin scheduler and the one worker thread that
    runs the models (``pool`` None: every request round robin)."""

    def __init__(self, pair: Pair, methods: dict[str, Method], *, max_active: int = 4,
                 max_queue: int = 64, timeout: float = 300.0, pool: BatchPool | None = None,
                 solo: bool = True, alone: dict[str, Method] | None = None):
        self.pair, self.tokenizer, self.methods = pair, pair.tokenizer, methods
        self.max_active, self.max_queue, self.timeout = max_active, max_queue, timeout
        self.pool, self.solo = pool, solo
        self.alone = alone or {}  # a lone request's method by its own name (docstring)
        self.turning: Job | None = None  # the round robin's job while its turn runs
        self.eos = tuple(eos_ids(pair.tokenizer, pair.target))
        self.waiting: deque[Job] = deque()
        self.active: deque[Job] = deque()
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "rejected": 0,
                       "errors": 0}
        self.worker_s = 0.0  # seconds the worker spent on batch turns (steps, detokenizing)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="cospec-decode")
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="cospec-encode")
        self.encoding = copy.deepcopy(pair.tokenizer)  # the encoder thread's own
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the one start ran in

    # --- the loop's side

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="cospec-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in (*self.active, *self.waiting, *self._batched()):
            job.cancelled = True
            job.end("cancelled")
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.encoder.shutdown(wait=True, cancel_futures=True)

    async def on_worker(self, fn, *args):
        """Run ``fn`` on the worker thread (the only thread that touches the models or
        ``self.tokenizer``; the encoder thread has its own copy: fast tokenizers are not safe
        to share between threads)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def encode(self, fn):
        """``fn(tokenizer)`` (a prompt's token ids) on the encoder thread, with a copy of the
        tokenizer that only that thread uses: it runs while the worker steps, instead of
        waiting behind the step for the worker."""
        return await asyncio.get_running_loop().run_in_executor(self.encoder, fn,
                                                                self.encoding)

    def _batched(self) -> list[Job]:
        """The live jobs of the batch pool (planned or decoding)."""
        if self.pool is None:
            return []
        return [j for j in self.pool.jobs() if not j.done]

    @property
    def decoding(self) -> int:
        return len(self.active) + (self.pool.live() if self.pool is not None else 0)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 429 when ``max_batch + max_active + max_queue``
        are in."""
        slots = self.max_active + (self.pool.max_batch if self.pool is not None else 0)
        if len(self.waiting) + self.decoding >= slots + self.max_queue:
            self.counts["rejected"] += 1
            raise ApiError(429, f"server busy: {self.decoding} requests decoding and "
                                f"{len(self.waiting)} queued (limit {self.max_queue}); retry "
                                "later", None, "queue_full")
        self.waiting.append(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client is gone: forget a queued job now, an active one at its next turn (a
        batched one's slot is freed before the next step)."""
        if job.done:
            return
        job.cancelled = True
        # a batched job's slot: see BatchPool; a job alone ends at its turn, as round robin's
        if job in self.waiting or (job.batch is not None and not job.solo):
            if job in self.waiting:
                self.waiting.remove(job)
            self.counts["cancelled"] += 1
            job.end("cancelled")
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def health(self) -> dict:
        batch = {} if self.pool is None else {
            "max_batch": self.pool.max_batch, "max_context": self.pool.max_context,
            "batch_slots_in_use": self.pool.slots_in_use(),
            "spec_off_at": self.pool.spec_off_at, "speculation_off": self.pool.switched,
            "engine_step_s": round(self.pool.step_s, 4),
            "batch_worker_s": round(self.worker_s, 4)}
        return {"status": "ok" if self.alive else "scheduler stopped",
                "active": self.decoding, "queued": len(self.waiting),
                "alone": sum(j.solo for j in (*self.active, self.turning) if j),
                "max_active": self.max_active, "max_queue": self.max_queue, **batch,
                **self.counts}

    async def _schedule(self) -> None:
        while True:
            now = time.monotonic()
            for job in [j for j in self.waiting if j.deadline <= now]:
                self.waiting.remove(job)
                self._timed_out(job)
            for job in [j for j in self._batched() if j.deadline <= now]:
                self._timed_out(job)
            if self.waiting and any(j.solo for j in self.active):
                await self._join_pool()
            self._admit(now)
            if not self.active and not (self.pool is not None and self.pool.busy):
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.pool is not None and self.pool.busy:
                await self._batch_turn()
            if self.active:
                await self._round_robin()

    def _admit(self, now: float) -> None:
        """Waiting jobs into free slots, first come first served on each path (a job that
        finds none holds back the later ones of its path)."""
        full_batch = full_rr = False
        keys = {j.batch for j in self.waiting if j.batch is not None}
        for job in list(self.waiting):
            if self._alone(job):
                job.solo = job.started_alone = True
                self.active.append(job)
            elif job.batch is not None:
                full_batch = full_batch or not self.pool.plan(job, job.batch, keys)
                if full_batch:
                    continue
            else:
                full_rr = full_rr or len(self.active) >= self.max_active
                if full_rr:
                    continue
                self.active.append(job)
            self.waiting.remove(job)
            job.started = job.started or now  # a job back from decoding alone keeps its own

    def _alone(self, job: Job) -> bool:
        """Does batchable ``job`` decode alone on the batch-1 path (the module docstring)?
        With ``solo``, when it is the only request waiting, none decodes, its method runs
        each block on the device for it, and it is greedy or unseeded (a seed gives the
        batch engine's tokens under any load)."""
        return (self.solo and job.batch is not None and len(self.waiting) == 1
                and not self.active and not (self.pool is not None and self.pool.live())
                and (job.sampling.greedy or job.seed is None)
                and job.method.device_block(job.prompt_ids, job.sampling))

    async def _join_pool(self) -> None:
        """Others wait: the job decoding alone goes to the front of the queue, its batch-1
        generation closed, to be planned in the pool and go on from its tokens."""
        for job in [j for j in self.active if j.solo]:
            self.active.remove(job)
            job.solo = False
            tokens, job.tokens = job.tokens, None
            if tokens is not None:
                try:
                    await self.on_worker(tokens.close)
                except Exception:  # its tokens so far stand; the pool goes on from them
                    log.exception("closing a generation failed")
            if job.cancelled and not job.done:  # its client left since its last turn
                self.counts["cancelled"] += 1
                job.end("cancelled")
            if not job.done:
                self.waiting.appendleft(job)

    async def _round_robin(self) -> None:
        """One turn of the round robin: the next active job's next token."""
        job = self.active.popleft()
        if not job.cancelled and time.monotonic() < job.deadline:
            self.turning = job
            await self._turn(job)
            self.turning = None
        elif not job.cancelled:
            self._timed_out(job)
        if job.cancelled and not job.done:
            self.counts["cancelled"] += 1
            job.end("cancelled")
        if not job.done:
            self.active.append(job)
        elif job.tokens is not None:
            tokens, job.tokens = job.tokens, None
            try:
                await self.on_worker(tokens.close)
            except Exception:  # the job is over anyway; keep serving the others
                log.exception("closing a generation failed")

    async def _batch_turn(self) -> None:
        """One step of every batch engine; each commit's tokens go to their job."""
        try:
            updates = await self.on_worker(self._batch_step)
        except Exception:  # a bug or a failing model: the batched requests fail
            log.exception("batched decoding failed")
            for job in self._batched():
                self.counts["errors"] += 1
                job.end("error")
            self.pool.clear()
            return
        self._apply(updates)

    def _apply(self, updates: list[tuple[Job, list[tuple[Token, str, int]], bool]]) -> None:
        """On the event loop: commits' detokenized tokens to their jobs (``_batch_step``)."""
        for job, toks, last in updates:
            if job.done:  # cancelled or timed out during the step
                continue
            for tok, text, fixed in toks:
                self._take(job, tok, text, fixed)
                if job.done:
                    self.counts["completed"] += 1
                    break
            if last and not job.done:  # the engine let go of a job not over: a bug
                log.error("a batch engine ended a request early")
                self.counts["errors"] += 1
                job.end("error")
            job.changed.set()

    def _batch_step(self) -> list[tuple[Job, list[tuple[Token, str, int]], bool]]:
        """On the worker thread: one pool turn, its tokens detokenized (and whether the
        engine let go of the job); its time counts in ``worker_s``. The first tokens of the
        requests starting in it go to the event loop as soon as they are decoded, while the
        step goes on (``BatchEngine.step``'s ``early``)."""
        t0 = time.perf_counter()
        out = self._detok(self.pool.turn(
            lambda firsts: self.loop.call_soon_threadsafe(self._apply, self._detok(firsts))))
        self.worker_s += time.perf_counter() - t0
        return out

    def _detok(self, commits: list[tuple[Job, Served]]
               ) -> list[tuple[Job, list[tuple[Token, str, int]], bool]]:
        """On the worker thread: each commit's tokens detokenized, with whether the engine
        let go of the job."""
        out = []
        for job, commit in commits:
            if job.detok is None:
                job.detok = TextStream(self.tokenizer)
            toks = []
            for tid, from_draft in zip(commit.tokens, commit.from_draft):
                fixed = len(job.detok.text)
                toks.append((Token(tid, from_draft), job.detok.add(tid), fixed))
                if tid in job.eos:
                    break
            out.append((job, toks, commit.done))
        return out

    def _timed_out(self, job: Job) -> None:
        job.timed_out = True
        self.counts["timed_out"] += 1
        job.end("length")

    async def _turn(self, job: Job) -> None:
        """One committed token for ``job`` (or its end)."""
        try:
            tok, text, fixed = await self.on_worker(self._step, job)
        except Exception:  # a bug or a failing model: only this request fails
            log.exception("decoding failed")
            self.counts["errors"] += 1
            job.end("error")
            return
        if tok is None:  # the loop ended by itself (EOS or max_tokens already seen)
            job.end("stop" if job.ids and job.ids[-1] in job.eos else "length")
        else:
            self._take(job, tok, text, fixed)
        if job.done:
            self.counts["completed"] += 1
        job.changed.set()

    @staticmethod
    def _take(job: Job, tok: Token, text: str, fixed: int) -> None:
        """Append one committed token (``text``: the text with it; ``fixed``: how much of
        it was final before) and end the job at a stop string, EOS or max_tokens."""
        job.ids.append(tok.id)
        job.from_draft += tok.from_draft
        longest = max(map(len, job.stops), default=0)
        cut = stop_at(text, job.stops, max(0, fixed - longest + 1))  # new text only
        job.text = text if cut is None else text[:cut]
        if cut is not None or tok.id in job.eos:
            job.end("stop")
        elif len(job.ids) >= job.max_tokens:
            job.end("length")

    def _step(self, job: Job) -> tuple[Token | None, str, int]:
        """On the worker thread: the next token, the decoded text so far, and how much of
        that text was already final before this token."""
        if job.tokens is None:
            method = self.alone.get(job.method.name, job.method) if job.solo else job.method
            job.tokens = method.stream(job.prompt_ids, k=job.k, max_new_tokens=job.max_tokens,
                                       sampling=job.sampling, eos_ids=job.eos, seed=job.seed,
                                       stats=job.stats)
            job.detok = TextStream(self.tokenizer)
        tok = next(job.tokens, None)
        if tok is None:
            return None, job.text, len(job.text)
        fixed = len(job.detok.text)
        return tok, job.detok.add(tok.id), fixed
