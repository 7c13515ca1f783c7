"""``cospec serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with per-request
speculative metrics.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events
with ``"stream": true``, one JSON object otherwise), ``GET /v1/models``, ``GET /health``.

Request fields: the OpenAI ones that apply (``model``, ``messages`` / ``prompt``,
``max_tokens`` (chat: or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``,
``seed``, ``stream``, ``stream_options.include_usage``, ``n`` = 1, ``user``) plus extensions,
which OpenAI clients send through ``extra_body``: ``method`` (one the server offers; default
``spd`` when a draft is loaded, else ``target``), ``k`` (draft length), ``top_k`` and
``ignore_eos``. An unknown field, a wrong type or an unsupported feature (``n`` > 1,
``logprobs``, penalties, tools, ...) is a 400. Defaults as OpenAI's: temperature 1, top-p 1;
``max_tokens`` defaults to ``default_max_tokens`` (capped by the context left).

Every response carries ``usage`` and a ``metrics`` extension (like vLLM's per-request
metrics): method, k, steps, drafted, accepted, tau, acceptance_rate, from_draft (committed
tokens that came from the draft), overrides / arbiter_calls (draft tokens an arbiter kept /
mismatches it saw), prefill_s, decode_s, tokens_per_s, queue_s, total_s, timed_out. A stream
attaches it to the chunk with the finish_reason (and to the usage chunk, if asked for).

Scheduling: one worker thread owns the models. A scheduler task admits requests first come,
first served into at most ``max_active`` live generations and steps those round robin, one
committed token per turn (the tokens of one speculative block come out of one forward pass,
so a turn is cheap after the first of a block). A long request therefore never holds a
short one back for its whole duration. Between turns it drops a request whose client went
away (detected by the send failing or by polling the connection every ``POLL_S``): its slot
is free after at most one step. The worker never waits on a client and a handler only waits
for its own tokens, so a slow reader delays nobody but itself. At most ``max_active +
max_queue`` requests are admitted; beyond that a request gets a 429 at once.

Time limit: ``timeout`` seconds from arrival, queueing included. A request that reaches it
ends as if it had reached max_tokens — finish_reason ``"length"`` — with
``metrics.timed_out`` true (and no text if it never started).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: invalid request
400, unknown model or route 404, wrong HTTP method 405, body over 8 MiB 413, full queue 429.
A 500 means a bug in the server: it is logged with its traceback, which the client never sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cospec.args import load_pair_of
from cospec.decoding import Token
from cospec.errors import CospecError
from cospec.methods import (
    GREEDY_ONLY,
    METHODS,
    SHIPPED_ARBITER,
    Method,
    MethodOptions,
    build_method,
    chat_ids,
    eos_ids,
    text_ids,
)
from cospec.models import Pair
from cospec.sampling import SamplingConfig
from cospec.stats import DecodeStats

log = logging.getLogger("cospec.server")

POLL_S = 0.1             # how often a waiting handler checks that its client is still there
MAX_BODY = 8 << 20       # request bodies above this are refused (413)
MAX_K = 32
MAX_STOPS = 4


# ----------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with HTTP ``status``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# the names pydantic gives the members of a union in an error's location (not fields)
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _validation_error(errors: list[dict]) -> ApiError:
    """One readable 400 from pydantic's list of errors (the first one named)."""
    def where(e: dict) -> str | None:
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
        return ".".join(loc) or None

    e, param = errors[0], where(errors[0])
    others = {where(x) for x in errors[1:]} - {param}
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {detail}", None, "invalid_json")
    if e.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif e.get("type") == "missing":
        msg = ("the request body must be a JSON object" if param is None
               else f"Missing required parameter: '{param}'")
    elif param is None:
        msg = f"the request body must be a JSON object ({e.get('msg', '')})"
    else:
        msg = f"Invalid value for '{param}': {e.get('msg', '')}"
    if others:
        msg += f" (and {len(others)} more invalid field{'s' if len(others) > 1 else ''})"
    return ApiError(400, msg, param, "invalid_value")


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over ``limit`` bytes gets a 413."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"0")
            if size.isdigit() and int(size) > self.limit:
                err = ApiError(413, f"request body over {self.limit} bytes", None, "too_large")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Common(_Strict):
    """Fields shared by both endpoints (OpenAI's, then cospec's extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # accepted only at their neutral values
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    # extensions
    method: str | None = None
    k: int | None = Field(None, ge=1, le=MAX_K)
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do."""
        if self.n != 1:
            return "n"
        for name in ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs"):
            if getattr(self, name):
                return name
        return None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        if self.top_logprobs or self.tools:
            return "top_logprobs" if self.top_logprobs else "tools"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        return super().unsupported()


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo or self.suffix:
            return "echo" if self.echo else "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


# ----------------------------------------------------------------------------- prompts


def context_length(pair: Pair) -> int:
    """Positions every loaded model supports (``max_position_embeddings``; the tokenizer's
    ``model_max_length`` or 32768 when a config has none)."""
    models = [m for m in (pair.target, pair.draft, *pair.extra) if m is not None]
    found = [getattr(m.config, "max_position_embeddings", None) for m in models]
    found = [int(n) for n in found if n]
    if found:
        return min(found)
    n = getattr(pair.tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**7 else 32768


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the first stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
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


# ----------------------------------------------------------------------------- engine

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
                    await self.on_worker(_close, tokens)
                except Exception:  # the job is over anyway; keep serving the others
                    log.exception("closing a generation failed")

    def _timed_out(self, job: Job) -> None:
        job.timed_out = True
        self.counts["timed_out"] += 1
        job.end("length")

    async def _turn(self, job: Job) -> None:
        """One committed token for ``job`` (or its end)."""
        try:
            tok, text = await self.on_worker(self._step, job)
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
            cut = stop_at(text, job.stops)
            job.text = text if cut is None else text[:cut]
            if cut is not None or tok.id in job.eos:
                job.end("stop")
            elif len(job.ids) >= job.max_tokens:
                job.end("length")
        if job.done:
            self.counts["completed"] += 1
        job.changed.set()

    def _step(self, job: Job) -> tuple[Token | None, str]:
        """On the worker thread: the next token and the decoded text so far.

        Generators of several requests are interleaved; each enters and leaves inference
        mode around its own yields, so every step runs inside an outer inference mode that
        makes whatever they restore consistent.
        """
        with torch.inference_mode():
            if job.tokens is None:
                job.tokens = job.method.stream(job.prompt_ids, k=job.k,
                                               max_new_tokens=job.max_tokens,
                                               sampling=job.sampling, eos_ids=job.eos,
                                               seed=job.seed, stats=job.stats)
            tok = next(job.tokens, None)
        if tok is None:
            return None, job.text
        return tok, self.tokenizer.decode(job.ids + [tok.id], skip_special_tokens=True)


def _close(tokens: Iterator[Token]) -> None:
    with torch.inference_mode():
        tokens.close()


# ----------------------------------------------------------------------------- the app

def default_methods(pair: Pair, arbiter: str | None) -> list[str]:
    """target; spd with a draft (the CoS methods with more than two models); cospec when an
    arbiter is given or the shipped one fits the pair."""
    if pair.draft is None:
        return ["target"]
    if pair.extra:
        return ["target", "cos-we", "cos-cd"]
    names = ["target", "spd"]
    if arbiter is not None:
        names.append("cospec")
    elif SHIPPED_ARBITER.exists():
        try:
            build_method("cospec", pair, MethodOptions())
            names.append("cospec")
        except CospecError as err:
            log.info("cospec not offered: %s", err)
    return names


def create_app(pair: Pair, *, methods: list[str] | None = None, arbiter: str | None = None,
               model_name: str | None = None, k: int = 4, max_active: int = 4,
               max_queue: int = 64, timeout: float = 300.0,
               default_max_tokens: int = 256) -> FastAPI:
    """The ASGI app serving an already loaded ``pair``.

    ``methods`` are built once here (CospecError for an unknown one or one the pair cannot
    run); the first of ``spd``, ``target`` or the first listed is the default.
    """
    names = list(methods) if methods else default_methods(pair, arbiter)
    built: dict[str, Method] = {}
    opts = MethodOptions(arbiter=arbiter)
    for name in names:
        if name not in METHODS or name == "hf-assisted":
            raise CospecError(f"cannot serve method {name!r}; choose from "
                              f"{', '.join(m for m in METHODS if m != 'hf-assisted')}")
        built[name] = build_method(name, pair, opts)
    if max_active < 1 or max_queue < 0 or timeout <= 0 or k < 1 or default_max_tokens < 1:
        raise CospecError("max_active, k, default_max_tokens and timeout must be > 0, "
                          "max_queue >= 0")
    default = next((m for m in ("spd", "target") if m in built), names[0])
    served = model_name or pair.target_name
    ctx = context_length(pair)
    vocab = int(getattr(pair.target.config, "vocab_size", 0) or len(pair.tokenizer))
    engine = Engine(pair, built, max_active=max_active, max_queue=max_queue, timeout=timeout)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="cospec", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return _validation_error(list(err.errors()) or [{}]).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return ApiError(err.status_code, str(err.detail), None, code).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        log.error("internal error on %s", request.url.path, exc_info=err)
        engine.counts["errors"] += 1
        return ApiError(500, "internal server error", None, "internal_error").response()

    @app.get("/health")
    async def health():
        return JSONResponse(engine.health(), status_code=200 if engine.alive else 503)

    def model_card() -> dict:
        return {"id": served, "object": "model", "created": created, "owned_by": "cospec",
                "max_model_len": ctx, "methods": list(built), "default_method": default}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name != served:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    async def prepare(body: _Common, prompt) -> Job:
        """Check a request and turn it into a job (ApiError on bad input)."""
        if body.model != served:
            raise ApiError(404, f"The model '{body.model}' does not exist (this server serves "
                                f"'{served}')", "model", "model_not_found")
        bad = body.unsupported()
        if bad:
            raise ApiError(400, f"'{bad}' is not supported by this server", bad, "unsupported")
        name = body.method or default
        if name not in built:
            raise ApiError(400, f"method {name!r} is not offered by this server; offered: "
                                f"{', '.join(built)}", "method", "invalid_method")
        # below 1e-5 greedy (as vLLM): logits / T would overflow into NaN probabilities
        sampling = SamplingConfig(body.temperature if body.temperature >= 1e-5 else 0.0,
                                  body.top_p, body.top_k)
        if name in GREEDY_ONLY and not sampling.greedy:
            raise ApiError(400, f"method {name} is greedy-only: send temperature 0",
                           "temperature", "invalid_value")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", "stop",
                           "invalid_value")
        try:
            ids = await engine.on_worker(prompt)
        except Exception as err:  # e.g. a chat template that refuses the conversation
            raise ApiError(400, f"could not encode the prompt: {err}", None,
                           "invalid_prompt") from None
        if not ids:
            raise ApiError(400, "the prompt is empty", None, "invalid_prompt")
        room = ctx - len(ids)
        where = "messages" if isinstance(body, ChatRequest) else "prompt"
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the "
                                f"prompt has {len(ids)} tokens", where, "context_length_exceeded")
        if limit is not None and limit > room:
            raise ApiError(400, f"max_tokens is too large: {limit}. This model's maximum "
                                f"context length is {ctx} tokens and the prompt has {len(ids)} "
                                "tokens", "max_tokens", "context_length_exceeded")
        now = time.monotonic()
        return Job(built[name], ids, limit or min(default_max_tokens, room), body.k or k,
                   sampling, body.seed, () if body.ignore_eos else engine.eos, stops,
                   deadline=now + timeout, arrived=now)

    async def complete(job: Job, request: Request, chat: bool, body: _Common):
        engine.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": served}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(engine, job, request, head, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        client = _Client(request)
        try:
            while not job.done:
                if not await client.wait(job.finished):
                    engine.cancel(job)
                    return JSONResponse({}, status_code=499)  # nobody reads it
        finally:
            engine.cancel(job)  # no-op once done
        if job.finish == "error":
            raise ApiError(500, "internal error while decoding", None, "internal_error")
        choice = ({"index": 0, "message": {"role": "assistant", "content": job.text},
                   "logprobs": None, "finish_reason": job.finish} if chat else
                  {"index": 0, "text": job.text, "logprobs": None, "finish_reason": job.finish})
        return {**head, "choices": [choice], "usage": job.usage(), "metrics": job.metrics()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": _utf8(m.text(), f"messages.{i}.content")}
                    for i, m in enumerate(body.messages)]
        job = await prepare(body, lambda: chat_ids(engine.tokenizer, messages))
        return await complete(job, request, True, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, "a batch of prompts is not supported: send one", "prompt",
                               "unsupported")
            p = p[0]
        if isinstance(p, list) and not all(0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt",
                           "invalid_value")
        ids = list(p) if isinstance(p, list) else None
        if ids is None:
            _utf8(p, "prompt")
        job = await prepare(body, (lambda: ids) if ids is not None
                            else (lambda: text_ids(engine.tokenizer, p)))
        return await complete(job, request, False, body)

    return app


def _utf8(text: str, param: str) -> str:
    """``text``, unless it cannot be encoded (a lone surrogate from a JSON escape): 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"'{param}' is not valid Unicode: {err.reason} at {err.start}",
                       param, "invalid_value") from None
    return text


class _Client:
    """Whether the client of a request is still there (asked at most every ``POLL_S``)."""

    def __init__(self, request: Request):
        self.request, self.asked = request, time.monotonic()

    async def wait(self, event: asyncio.Event) -> bool:
        """Wait until ``event`` is set or ``POLL_S`` passes; False if the client is gone."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), POLL_S)
        if time.monotonic() - self.asked < POLL_S:
            return True
        self.asked = time.monotonic()
        return not await self.request.is_disconnected()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _events(engine: Engine, job: Job, request: Request, head: dict, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of one streamed request. Text is sent as it becomes final
    (see ``safe_len``); a client that goes away cancels the job (the send fails, or the
    poll sees it)."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, finish: str | None = None, **extra) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    client = _Client(request)
    try:
        if chat:
            first = chunk("")
            first["choices"][0]["delta"]["role"] = "assistant"
            yield _sse(first)
        sent = 0
        while True:
            job.changed.clear()
            done = job.done
            ready = len(job.text) if done else safe_len(job.text, job.stops)
            if ready > sent:
                yield _sse(chunk(job.text[sent:ready]))
                sent = ready
            if done:
                break
            if not job.changed.is_set() and not await client.wait(job.changed):
                return
        if job.finish == "error":
            err = ApiError(500, "internal error while decoding", None, "internal_error")
            yield _sse(err.body())
        else:
            yield _sse(chunk(None, job.finish, metrics=job.metrics()))
            if include_usage:
                yield _sse({**head, "choices": [], "usage": job.usage(),
                            "metrics": job.metrics()})
        yield _sse("[DONE]")
    finally:
        engine.cancel(job)  # no-op once done


# ----------------------------------------------------------------------------- running it

class BackgroundServer:
    """Serve ``app`` with uvicorn from a thread, on a loopback port (0: any free one).

    ``with BackgroundServer(app) as srv: ... srv.url ...`` — used by the tests and the load
    test; ``cospec serve`` runs uvicorn in the foreground instead.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="cospec-server")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket (CospecError if the address cannot be had)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as err:
        raise CospecError(f"cannot listen on {host}:{port}: {err}") from None
    return sock


def cmd_serve(args) -> int:
    import uvicorn

    for flag, value, low in (("--port", args.port, 0), ("--max-active", args.max_active, 1),
                             ("--max-queue", args.max_queue, 0),
                             ("--default-max-tokens", args.default_max_tokens, 1)):
        if value < low:
            raise CospecError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535 or args.timeout <= 0:
        raise CospecError("--port must be <= 65535 and --timeout > 0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.arbiter:
        from cospec.arbiter import arbiter_info

        arbiter_info(args.arbiter)
    sock = bind(args.host, args.port)  # fail on a busy port before minutes of model loading
    pair = load_pair_of(args, need_draft=methods != ["target"])
    app = create_app(pair, methods=methods, arbiter=args.arbiter,
                     model_name=args.served_model_name, k=args.k, max_active=args.max_active,
                     max_queue=args.max_queue, timeout=args.timeout,
                     default_max_tokens=args.default_max_tokens)
    engine: Engine = app.state.engine
    print(f"serving {args.served_model_name or pair.target_name} on "
          f"http://{args.host}:{sock.getsockname()[1]} (methods: {', '.join(engine.methods)})",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on")).run(sockets=[sock])
    return 0
