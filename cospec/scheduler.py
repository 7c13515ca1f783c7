"""The scheduler of ``cospec serve``: a request queue, round-robin stepping of the live
generations on one worker thread, and the limits (queue size, time limit, cancellation).

One worker thread owns the models. A scheduler task admits requests first come, first served
into at most ``max_active`` live generations and steps those round robin, one committed token
per turn (the tokens of one speculative block come out of one forward pass, so a turn is
cheap after the first of a block). A long request therefore never holds a short one back for
its whole duration. Between turns it drops a request whose client went away (``cancel``): its
slot is free after at most one step. The worker never waits on a client and a handler only
waits for its own tokens, so a slow reader delays nobody but itself. At most ``max_active +
max_queue`` requests are admitted; beyond that a request gets a 429 at once.

Time limit: ``timeout`` seconds from arrival, queueing included. A request that reaches it
ends as if it had reached max_tokens — finish_reason ``"length"`` — with
``metrics.timed_out`` true (and no text if it never started).

Text: each committed token is detokenized incrementally (``TextStream``: tokenizers'
``DecodeStream``, O(1) a token), and stop strings are looked for in the new text only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from cospec.decoding import Token
from cospec.methods import Method, eos_ids
from cospec.models import Pair
from cospec.sampling import SamplingConfig
from cospec.server_schemas import ApiError
from cospec.stats import DecodeStats

log = logging.getLogger("cospec.server")


# ----------------------------------------------------------------------------- text

def stop_at(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the first stop string in ``text`` that begins at ``start`` or later, or
    None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def safe_len(text: str, stops: tuple[str, ...]) -> int:
    """How much of a growing ``text`` can be sent now: not a trailing incomplete character
    ("\\ufffd" from a split multi-byte sequence), nor a suffix that could start a stop
    string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for j in range(min(len(s) - 1, n), hold, -1):
            if text.endswith(s[:j], 0, n):
                hold = j
                break
    return n - hold


class TextStream:
    """The text of a growing sequence of token ids (special tokens skipped), one id at a time.

    A fast tokenizer goes through tokenizers' ``DecodeStream``: each id costs a decode of a
    few ids, not of the whole sequence. ``DecodeStream`` holds back a character still
    incomplete (a multi-byte sequence split between tokens); ``add`` then shows it as a full
    decode does, as "\ufffd", from the ids not yet settled. A tokenizer without a ``tokenizers``
    backend (or whose decoder the stream refuses) is decoded whole at every id.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.ids: list[int] = []
        self.text = ""    # the text of ids[:settled], final
        self.settled = 0

    def add(self, token_id: int) -> str:
        """Append ``token_id``; returns the text of every id so far, equal to
        ``tokenizer.decode(ids, skip_special_tokens=True)``. Its first ``len(self.text)``
        characters (before this call) never change."""
        self.ids.append(token_id)
        if self.stream is not None:
            try:
                piece = self.stream.step(self.backend, token_id)
            except Exception:  # a decoder whose text is not prefix-stable: decode it whole
                self.stream = None
            else:
                if piece is not None:
                    self.text += piece
                    self.settled = len(self.ids)
                    return self.text
                return self.text + self.tokenizer.decode(self.ids[self.settled:],
                                                         skip_special_tokens=True)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


@dataclass(eq=False)
class Job:
    """One request, from admission to its last token."""

    method: Method
    prompt_ids: list[int]
    max_tokens: int
    k: int
    sampling: SamplingConfig
    seed: int | None
    eos: tuple[int, ...]
    stops: tuple[str, ...]
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    ids: list[int] = field(default_factory=list)
    from_draft: int = 0
    text: str = ""
    finish: str | None = None       # "stop" | "length" | "cancelled" | "error"
    timed_out: bool = False
    cancelled: bool = False
    stats: DecodeStats = field(default_factory=DecodeStats)
    changed: asyncio.Event = field(default_factory=asyncio.Event)   # a token or the end
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: Iterator[Token] | None = None
    detok: TextStream | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def end(self, reason: str) -> None:
        if self.finish is None:
            self.finish, self.ended = reason, time.monotonic()
            self.stats.generated = len(self.ids)
        self.changed.set()
        self.finished.set()

    def metrics(self) -> dict:
        s = self.stats
        now = self.ended or time.monotonic()
        return {"method": self.method.name,
                "k": self.k if self.method.proposer is not None else None,
                "steps": s.steps, "drafted": s.drafted, "accepted": s.accepted,
                "tau": s.tau, "acceptance_rate": s.acceptance_rate,
                "from_draft": self.from_draft, "overrides": s.overrides,
                "arbiter_calls": s.arbiter_calls, "prefill_s": s.prefill_s,
                "decode_s": s.decode_s, "tokens_per_s": s.tokens_per_s,
                "queue_s": (self.started or now) - self.arrived, "total_s": now - self.arrived,
                "timed_out": self.timed_out}

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.ids),
                "total_tokens": len(self.prompt_ids) + len(self.ids)}


class Engine:
    """The queue, the round-robin scheduler and the one worker thread that runs the models."""

    def __init__(self, pair: Pair, methods: dict[str, Method], *, max_active: int = 4,
                 max_queue: int = 64, timeout: float = 300.0):
        self.pair, self.tokenizer, self.methods = pair, pair.tokenizer, methods
        self.max_active, self.max_queue, self.timeout = max_active, max_queue, timeout
        self.eos = tuple(eos_ids(pair.tokenizer, pair.target))
        self.waiting: deque[Job] = deque()
        self.active: deque[Job] = deque()
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "rejected": 0,
                       "errors": 0}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="cospec-decode")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # --- the loop's side

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="cospec-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in (*self.active, *self.waiting):
            job.cancelled = True
            job.end("cancelled")
        self.worker.shutdown(wait=True, cancel_futures=True)

    async def on_worker(self, fn, *args):
        """Run ``fn`` on the worker thread (the only thread that touches models or the
        tokenizer: fast tokenizers are not safe to share between threads)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 429 when ``max_active + max_queue`` are in."""
        if len(self.waiting) + len(self.active) >= self.max_active + self.max_queue:
            self.counts["rejected"] += 1
            raise ApiError(429, f"server busy: {len(self.active)} requests decoding and "
                                f"{len(self.waiting)} queued (limit {self.max_queue}); retry "
                                "later", None, "queue_full")
        self.waiting.append(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client is gone: forget a queued job now, an active one at its next turn."""
        if job.done:
            return
        job.cancelled = True
        if job in self.waiting:
            self.waiting.remove(job)
            self.counts["cancelled"] += 1
            job.end("cancelled")
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def health(self) -> dict:
        return {"status": "ok" if self.alive else "scheduler stopped",
                "active": len(self.active), "queued": len(self.waiting),
                "max_active": self.max_active, "max_queue": self.max_queue, **self.counts}

    async def _schedule(self) -> None:
        while True:
            now = time.monotonic()
            for job in [j for j in self.waiting if j.deadline <= now]:
                self.waiting.remove(job)
                self._timed_out(job)
            while self.waiting and len(self.active) < self.max_active:
                job = self.waiting.popleft()
                job.started = now
                self.active.append(job)
            if not self.active:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self.active.popleft()
            if not job.cancelled and time.monotonic() < job.deadline:
                await self._turn(job)
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
            job.ids.append(tok.id)
            job.from_draft += tok.from_draft
            longest = max(map(len, job.stops), default=0)
            cut = stop_at(text, job.stops, max(0, fixed - longest + 1))  # new text only
            job.text = text if cut is None else text[:cut]
            if cut is not None or tok.id in job.eos:
                job.end("stop")
            elif len(job.ids) >= job.max_tokens:
                job.end("length")
        if job.done:
            self.counts["completed"] += 1
        job.changed.set()

    def _step(self, job: Job) -> tuple[Token | None, str, int]:
        """On the worker thread: the next token, the decoded text so far, and how much of
        that text was already final before this token."""
        if job.tokens is None:
            job.tokens = job.method.stream(job.prompt_ids, k=job.k,
                                           max_new_tokens=job.max_tokens,
                                           sampling=job.sampling, eos_ids=job.eos,
                                           seed=job.seed, stats=job.stats)
            job.detok = TextStream(self.tokenizer)
        tok = next(job.tokens, None)
        if tok is None:
            return None, job.text, len(job.text)
        fixed = len(job.detok.text)
        return tok, job.detok.add(tok.id), fixed
