"""One request of ``cospec serve``, from admission to its last token: what the scheduler
(``cospec.scheduler``) and the batch pool (``cospec.batch_scheduler``) read and write."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cospec.decoding import Token
from cospec.methods import Method
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats
from cospec.text_stream import TextStream, outside_vocab

log = logging.getLogger("cospec.server")


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
    batch: tuple[str, int] | None = None    # its batch engine's (method, k); None: round robin
    speculation_off: bool = False  # spd planned target-only under load (``batch_scheduler``)
    solo: bool = False  # a batchable request decoding alone on the batch-1 path (``scheduler``)
    started_alone: bool = False  # it began so (it may have joined the batch engines since)

    @property
    def done(self) -> bool:
        return self.finish is not None

    def end(self, reason: str) -> None:
        """Finish the request (once: a later call only wakes its waiters again); a log line
        if its tokens hold ids the tokenizer has no text for (``outside_vocab``)."""
        if self.finish is None:
            self.finish, self.ended = reason, time.monotonic()
            self.stats.generated = len(self.ids)
            said = self.detok and outside_vocab(self.ids, self.detok.tokenizer)
            if said:
                log.warning("a request's %s", said)
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
                "timed_out": self.timed_out, "speculation_off": self.speculation_off,
                "started_alone": self.started_alone}

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.ids),
                "total_tokens": len(self.prompt_ids) + len(self.ids)}
