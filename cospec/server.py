"""``cospec serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with per-request
speculative metrics.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events
with ``"stream": true``, one JSON object otherwise), ``GET /v1/models``, ``GET /health``.

Requests and errors are the pydantic models of ``cospec.server_schemas``; the queue, the
stepping and the limits are ``cospec.scheduler``'s, the batch engines
``cospec.batch_scheduler``'s. ``max_tokens`` defaults to ``default_max_tokens`` (capped by
the context left). Context: ``max_context`` tokens per request (prompt + completion; at most
the model's), the length of a batch slot; KV caches for ``max_batch`` slots are the budget,
checked against free memory at start.

Every response carries ``usage`` and a ``metrics`` extension (like vLLM's per-request
metrics): method, k, steps, drafted, accepted, tau, acceptance_rate, from_draft (committed
tokens that came from the draft), overrides / arbiter_calls (draft tokens an arbiter kept /
mismatches it saw), prefill_s, decode_s, tokens_per_s, queue_s, total_s, timed_out,
speculation_off (an spd or lookup request decoded target-only because ``spec_off_at``
requests or more decoded at once, or did within the last second:
``cospec.batch_scheduler``), started_alone (it began on the batch-1 path, nothing else
decoding: ``cospec.scheduler``). A stream attaches it to the chunk with the finish_reason
(and to the usage chunk, if asked for).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: invalid request
400, unknown model or route 404, wrong HTTP method 405, body over 8 MiB 413, full queue 429.
A 500 means a bug in the server: it is logged with its traceback, which the client never sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cospec.args import load_pair_of
from cospec.batch_methods import engine_models
from cospec.batch_scheduler import (
    SPEC_OFF_AT,
    SPEC_OFF_METHODS,
    BatchPool,
    check_memory,
    engine_key,
    reserve,
    spec_rows,
)
from cospec.errors import CospecError
from cospec.fast import MAX_GRAPH
from cospec.fast_batch_warm import captures
from cospec.job import Job
from cospec.lookup import LOOKUP_METHODS
from cospec.methods import (
    GREEDY_ONLY,
    OWN_METHODS,
    SHIPPED_ARBITER,
    TARGET_OUTPUT,
    Method,
    MethodOptions,
    build_method,
    chat_ids,
    needs_draft,
    text_ids,
)
from cospec.models import Pair, context_length, reads_int8
from cospec.sampling import GREEDY, GREEDY_BELOW, SamplingConfig
from cospec.scheduler import Engine
from cospec.server_schemas import (
    ApiError,
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    validation_error,
)
from cospec.text_stream import safe_len

log = logging.getLogger("cospec.server")

DEFAULT_MAX_CONTEXT = 2048
POLL_S = 0.1             # how often a waiting handler checks that its client is still there
MAX_BODY = 8 << 20       # request bodies above this are refused (413)
MAX_STOPS = 4

# the sampling of a request that sets none (OpenAI's defaults: temperature 1, top-p 1)
REQUEST_SAMPLING = SamplingConfig(*(CommonRequest.model_fields[f].default
                                    for f in ("temperature", "top_p", "top_k")))


def int8_batch(names: list[str]) -> str:
    """Why ``names`` (batched methods whose output depends on the draft) are refused with an
    int8 draft and batch engines."""
    return (f"{', '.join(names)} with --draft-weights int8 and batch engines: a draft's int8 "
            "copies are read by the batch-1 engines only and the batch engines compute from "
            "its own weights, so under load these would decode with another draft; serve "
            "them with --max-batch 0 (max_batch=0), or serve methods whose output is the "
            f"target's ({', '.join(TARGET_OUTPUT)})")


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



def int8_readers(names: list[str], pair: Pair, max_batch: int, solo: bool) -> list[str]:
    """Of served ``names``, those whose requests may decode on a batch-1 path, where a
    draft's int8 copies are read: all without batch engines; beside them the methods no
    batch engine runs (spd-lookup, spd-staged), and on a GPU with ``solo`` spd (a lone
    request, ``scheduler``)."""
    if not max_batch:
        return list(names)
    gpu_solo = (solo and pair.draft is not None
                and next(pair.draft.parameters()).device.type == "cuda")
    return [m for m in names
            if m in LOOKUP_METHODS and m != "lookup" or gpu_solo and m == "spd"]


def default_methods(pair: Pair, arbiter: str | None, copies: bool = False) -> list[str]:
    """target; spd with a draft (the CoS methods with more than two models); cospec when an
    arbiter is given or the shipped one fits the pair, unless ``copies`` (an int8 draft
    beside batch engines: ``int8_batch``)."""
    if pair.draft is None:
        return ["target"]
    if pair.extra:  # the CoS methods combine the draft: not beside batch engines then
        return ["target"] if copies else ["target", "cos-we", "cos-cd"]
    names = ["target", "spd"]
    if copies:
        log.info("cospec not offered: its batch engine would read another draft than the "
                 "int8 one (--max-batch 0 serves it)")
    elif arbiter is not None:
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
               default_max_tokens: int = 256, max_batch: int = 16,
               max_context: int | None = None, warm_up: bool = False,
               spec_off_at: int = SPEC_OFF_AT, solo: bool = True) -> FastAPI:
    """The ASGI app serving an already loaded ``pair``.

    ``methods`` are built once here (CospecError for an unknown one or one the pair cannot
    run); the first of ``spd``, ``target`` or the first listed is the default. ``max_batch``
    0: no batch engines, every request round robin. ``warm_up``: the default method's batch
    engine (at ``k``) is built now and its CUDA graphs captured (``warm``). ``spec_off_at``:
    spd and lookup requests planned while that many would decode at once run target-only
    (0: never).
    ``solo``: a lone request of a method whose batch-1 loop runs each block on the device
    decodes there until another arrives (``cospec.scheduler``).
    """
    copies = bool(max_batch) and reads_int8(pair.draft)  # an int8 draft beside batch engines
    names = list(methods) if methods else default_methods(pair, arbiter, copies)
    built: dict[str, Method] = {}
    opts = MethodOptions(arbiter=arbiter)
    for name in names:
        if name not in OWN_METHODS:
            raise CospecError(f"cannot serve method {name!r}; choose from "
                              f"{', '.join(OWN_METHODS)}")
        built[name] = build_method(name, pair, opts)
    if (max_active < 1 or max_queue < 0 or not 0 < timeout < math.inf or k < 1
            or default_max_tokens < 1
            or max_batch < 0 or (max_context is not None and max_context < 2)
            or spec_off_at < 0):
        raise CospecError("max_active, k, default_max_tokens and timeout must be > 0 (timeout "
                          "finite), max_queue, max_batch and spec_off_at >= 0, "
                          "max_context >= 2")
    batched = [m for m in built.values() if engine_key(m, 1) is not None]
    mixed = [m.name for m in batched if m.name not in TARGET_OUTPUT
             and any(reads_int8(x) for x in engine_models(m))]
    if max_batch and mixed:
        raise CospecError(int8_batch(mixed))
    if copies:
        log.info("the draft's int8 copies serve a lone request decoding alone on the batch-1 "
                 "path (on a GPU); the batch engines read its own weights")
    default = next((m for m in ("spd", "target") if m in built), names[0])
    served = model_name or pair.target_name
    ctx = min(context_length(pair), max_context or DEFAULT_MAX_CONTEXT)
    if max_context is not None and max_context > ctx:
        log.warning("max_context %d is past the models' %d positions: serving %d", max_context,
                    ctx, ctx)
    vocab = int(getattr(pair.target.config, "vocab_size", 0) or len(pair.tokenizer))
    pool = None
    if max_batch and batched:
        models = list({id(x): x for m in batched for x in engine_models(m)}.values())
        # spd's and lookup's target-only engine under load, their rows beside the slots
        off = spec_off_at > 0 and any(m.name in SPEC_OFF_METHODS for m in batched)
        extra = spec_rows(max_batch, spec_off_at) if off else 0
        kv, prefill = check_memory(models, max_batch, ctx, extra)
        log.info("batch engines: %d slots (+ %d) x %d tokens, %.2f GiB of KV cache at most, "
                 "%.2f GiB for the largest prefill pass", max_batch, extra, ctx, kv / 2**30,
                 prefill / 2**30)
        pool = BatchPool(max_batch, ctx, spec_off_at=spec_off_at if off else 0,
                         target=(built.get("target") or build_method("target", pair, opts))
                         if off else None)
    # a lone spd request decodes as spd-staged: spd's tokens in fewer draft steps (scheduler)
    alone = ({"spd": build_method("spd-staged", pair, opts)}
             if solo and pool is not None and "spd" in built else {})
    if warm_up:
        warm(pool, built[default], k)
        if solo and pool is not None:
            warm_alone(alone.get(default, built[default]), k, ctx, served=default)
    engine = Engine(pair, built, max_active=max_active, max_queue=max_queue, timeout=timeout,
                    pool=pool, solo=solo, alone=alone)
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
        return validation_error(list(err.errors()) or [{}]).response()

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

    async def prepare(body: CommonRequest, prompt) -> Job:
        """Check a request and turn it into a job (ApiError on bad input); ``prompt``:
        tokenizer -> token ids, run on the scheduler's encoder thread."""
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
        sampling = SamplingConfig(body.temperature if body.temperature >= GREEDY_BELOW else 0.0,
                                  body.top_p, body.top_k)
        if name in GREEDY_ONLY and not sampling.greedy:
            raise ApiError(400, f"method {name} is greedy-only: send temperature 0",
                           "temperature", "invalid_value")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", "stop",
                           "invalid_value")
        try:
            ids = await engine.encode(prompt)
        except Exception as err:  # e.g. a chat template that refuses the conversation
            raise ApiError(400, f"could not encode the prompt: {err}", None,
                           "invalid_prompt") from None
        if not ids:
            raise ApiError(400, "the prompt is empty", None, "invalid_prompt")
        method, draft_len = built[name], body.k or k
        key = engine_key(method, draft_len) if pool is not None else None
        kept = reserve(method, draft_len) if key is not None else 0
        room = ctx - kept - len(ids)
        where = "messages" if isinstance(body, ChatRequest) else "prompt"
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        context = (f"This server's maximum context length is {ctx} tokens per request "
                   f"(--max-context{f', {kept} of them kept for the batch step' if kept else ''})")
        if room < 1:
            raise ApiError(400, f"{context}, but the prompt has {len(ids)} tokens", where,
                           "context_length_exceeded")
        if limit is not None and limit > room:
            raise ApiError(400, f"max_tokens is too large: {limit}. {context} and the prompt "
                                f"has {len(ids)} tokens", "max_tokens", "context_length_exceeded")
        now = time.monotonic()
        return Job(method, ids, limit or min(default_max_tokens, room), draft_len, sampling,
                   body.seed, () if body.ignore_eos else engine.eos, stops,
                   deadline=now + timeout, arrived=now, batch=key)

    async def complete(job: Job, request: Request, chat: bool, body: CommonRequest):
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
        job = await prepare(body, lambda tok: chat_ids(tok, messages))
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
        job = await prepare(body, (lambda tok: ids) if ids is not None
                            else (lambda tok: text_ids(tok, p)))
        return await complete(job, request, False, body)

    return app


def warm(pool: BatchPool | None, method: Method, k: int) -> None:
    """``--warm-up``: build ``method``'s batch engine at ``k`` over every slot (spd or lookup
    under the speculation-off rule: over spec_off_at - 1 rows beside them, the target-only
    engine over every slot) and capture its CUDA graphs before any request
    (``BatchPool.warm``); logs what it did. Nothing to do on a CPU (no graphs), without
    batch engines, or for a method no engine runs."""
    device = next(method.verifier.parameters()).device
    done = []
    if pool is None:
        why = "no batch engines (--max-batch 0, or no batched method)"
    elif not captures(device):
        why = f"no CUDA graphs on {device}"
    else:
        done = pool.warm(method, k)
        why = f"{method.name} at k={k} runs in no batch engine"
    if not done:
        log.info("--warm-up: %s: nothing to warm up", why)
    for group, did in done:
        at = f" at k={group.key[1]}" if group.key[1] else ""
        log.info("--warm-up: %s%s, %d slots: %s", group.method.name, at, group.size, did)


def warm_alone(method: Method, k: int, context: int, tokens: int = 8,
               served: str | None = None) -> None:
    """``--warm-up`` for the lone-request path (``cospec.scheduler``): where ``method``'s
    batch-1 loop runs each block on the device, a few tokens of a generation with room for
    ``context`` tokens, greedy and at an OpenAI request's default sampling (temperature 1,
    top-p 1: another block graph), so that its engines are made at full size
    (``fast.acquire`` reuses them for every shorter request) and their graphs captured
    before any request: greedy from a prompt of each length up to ``fast.MAX_GRAPH`` (each
    length's prefill is a graph of its own), then of one more token (a fill from slot 0,
    which captures every padded prefill length), the steps and both blocks. Logs what it did
    (``served``: the method whose lone requests ``method`` decodes, when another)."""
    name = method.name if served in (None, method.name) else f"{served} (as {method.name})"
    longest = list(range(1, MAX_GRAPH + 2))
    for sampling, how in ((GREEDY, "greedy"), (REQUEST_SAMPLING, "at temperature 1")):
        if not method.device_block(longest, sampling):
            log.info("--warm-up: %s runs no device-side block %s here: nothing to warm alone",
                     name, how)
            continue
        t0 = time.perf_counter()
        for n in range(1, len(longest) + 1) if sampling is GREEDY else [len(longest)]:
            prompt = longest[:n]
            with contextlib.closing(method.stream(prompt, k=k, max_new_tokens=context - n,
                                                  sampling=sampling, eos_ids=())) as gen:
                for _ in itertools.islice(gen, tokens):
                    pass
        log.info("--warm-up: %s alone at k=%d, %s, %d tokens of context: %.1f s", name, k,
                 how, context, time.perf_counter() - t0)


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


def _show_logs() -> None:
    """cospec's start-up lines (the KV budget, the warm-up) on stderr, as uvicorn's own."""
    logger = logging.getLogger("cospec")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cmd_serve(args) -> int:
    import uvicorn

    for flag, value, low in (("--port", args.port, 0), ("--max-active", args.max_active, 1),
                             ("--max-queue", args.max_queue, 0),
                             ("--max-batch", args.max_batch, 0),
                             ("--max-context", args.max_context, 2),
                             ("--default-max-tokens", args.default_max_tokens, 1),
                             ("--spec-off-at", args.spec_off_at, 0)):
        if value < low:
            raise CospecError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535 or args.timeout <= 0:
        raise CospecError("--port must be <= 65535 and --timeout > 0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.methods is not None and not methods:
        raise CospecError(f"--methods {args.methods!r} names no method")
    unknown = [m for m in methods or () if m not in OWN_METHODS]
    if unknown:  # before minutes of loading (create_app refuses them too)
        raise CospecError(f"cannot serve method(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(OWN_METHODS)}")
    mixed = [m for m in methods or () if m not in TARGET_OUTPUT and m not in ("we", "cd")]
    if args.draft_weights == "int8" and args.max_batch and mixed:  # before minutes of loading
        raise CospecError(int8_batch(mixed))
    if args.arbiter:
        from cospec.arbiter import arbiter_info

        arbiter_info(args.arbiter)
    sock = bind(args.host, args.port)  # fail on a busy port before minutes of model loading
    _show_logs()
    offered: list[str] = []  # --draft-weights auto: what it was resolved for

    def offer(pair: Pair) -> tuple[list[str], list[str]]:
        offered[:] = methods or default_methods(pair, args.arbiter)
        return offered, int8_readers(offered, pair, args.max_batch, args.solo)

    pair = load_pair_of(args, need_draft=needs_draft(methods), methods=offer)
    app = create_app(pair, methods=offered or methods, arbiter=args.arbiter,
                     model_name=args.served_model_name, k=args.k, max_active=args.max_active,
                     max_queue=args.max_queue, timeout=args.timeout,
                     default_max_tokens=args.default_max_tokens, max_batch=args.max_batch,
                     max_context=args.max_context, warm_up=args.warm_up,
                     spec_off_at=args.spec_off_at, solo=args.solo)
    engine: Engine = app.state.engine
    print(f"serving {args.served_model_name or pair.target_name} on "
          f"http://{args.host}:{sock.getsockname()[1]} (methods: {', '.join(engine.methods)})",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on")).run(sockets=[sock])
    return 0
