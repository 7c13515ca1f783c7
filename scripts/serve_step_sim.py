"""Where a served request waits, with engine steps as long as a GPU's.

cospec serve in-process on the tests' tiny models, each batch-engine step stretched to at
least ``--step`` seconds plus ``--per-token`` seconds for each token a row decodes in it (a
target-only step decodes COSPEC_RUN_AHEAD of them) by a sleep (which releases the GIL, as a
CUDA wait does), 4 streaming clients in a closed loop, 12 requests each, ``--tokens`` tokens
(EOS ignored), after one untimed round.
``--encode`` says where prompts are encoded: ``worker`` (on the decode worker, queued behind
the running step: how cospec serve did it before) or ``own`` (on their own thread with a copy
of the tokenizer, as now). ``--first`` says when a new request's first token leaves a
target-only step: ``early`` (as soon as it is decoded, ``--step`` + ``--per-token`` into the
step, while the step goes on: as now) or ``step`` (with the step's other tokens, at its end:
how cospec serve did it before).

    PYTHONPATH=. python scripts/serve_step_sim.py --encode own --step 0.02 [--first step]
    COSPEC_RUN_AHEAD=4 PYTHONPATH=. python scripts/serve_step_sim.py --encode own --step 0.0005 \
        --per-token 0.0022 --tokens 128

Prints first-token and latency medians and the tokens/s over the timed round. A simulation
of the scheduling, not a speed figure: on the CPU the tiny model's own step takes about a
millisecond.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from load_test import tiny_pair  # noqa: E402

from cospec import scheduler  # noqa: E402
from cospec.cli import check_settings  # noqa: E402
from cospec.errors import CospecError  # noqa: E402
from cospec.fast_batch import BatchEngine  # noqa: E402
from cospec.server import BackgroundServer, create_app  # noqa: E402

CLIENTS, REQUESTS = 4, 12


def stretch(step_s: float, per_token_s: float, early: bool) -> None:
    """Every BatchEngine step lasts at least ``step_s`` + ``per_token_s`` x the tokens a row
    decodes in it (``width``: run-ahead, or k + 1) seconds from now on; with ``early`` its
    first tokens are handed over ``step_s`` + ``per_token_s`` into it, else at its end."""
    real = BatchEngine.step

    def slow(self, first=None):
        t0 = time.perf_counter()

        def decoded(commits):  # the first token is ready after one token's time
            time.sleep(max(0.0, step_s + per_token_s - (time.perf_counter() - t0)))
            first(commits)

        out = real(self, decoded if early and first is not None else None)
        time.sleep(max(0.0, step_s + per_token_s * self.width - (time.perf_counter() - t0)))
        return out

    BatchEngine.step = slow


def encode_on_worker() -> None:
    """Prompts encoded on the decode worker, behind its running step (the earlier server)."""
    async def on_worker(self, fn):
        return await self.on_worker(fn, self.tokenizer)

    scheduler.Engine.encode = on_worker


async def client(url: str, i: int, tokens: int, out: list[tuple[float, float]]) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        for j in range(REQUESTS):
            t0, first = time.perf_counter(), None
            async with c.stream("POST", url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"client {i} request {j} hello",
                    "max_tokens": tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}) as r:
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter() - t0
            out.append((first, time.perf_counter() - t0))


async def load(url: str, tokens: int) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    await asyncio.gather(*(client(url, i, tokens, out) for i in range(CLIENTS)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encode", choices=("worker", "own"), required=True)
    ap.add_argument("--step", type=float, default=0.02, help="seconds a step lasts at least")
    ap.add_argument("--per-token", type=float, default=0.0,
                    help="seconds more for each token a row decodes in the step")
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens of each request")
    ap.add_argument("--first", choices=("early", "step"), default="early",
                    help="a new request's first token: as soon as decoded, or at step end")
    args = ap.parse_args()
    if not (0 <= args.step <= 1 and 0 <= args.per_token <= 0.1 and 1 <= args.tokens <= 400):
        ap.error("--step is 0 to 1 s, --per-token 0 to 0.1 s, --tokens 1 to 400")
    try:
        check_settings()  # COSPEC_RUN_AHEAD among them
    except CospecError as err:
        ap.error(str(err))
    stretch(args.step, args.per_token, args.first == "early")
    if args.encode == "worker":
        encode_on_worker()
    pair, _ = tiny_pair()
    app = create_app(pair, methods=["target"], max_batch=16, max_queue=64)
    with BackgroundServer(app) as srv:
        asyncio.run(load(srv.url, args.tokens))  # untimed
        t0 = time.perf_counter()
        out = asyncio.run(load(srv.url, args.tokens))
        wall = time.perf_counter() - t0
    first = statistics.median(a for a, _ in out)
    latency = statistics.median(b for _, b in out)
    print(f"encode {args.encode:6s} step {args.step * 1e3:.1f} ms + {args.per_token * 1e3:.1f} "
          f"ms a token, run-ahead {app.state.engine.pool.groups[0].engine.ahead}, first "
          f"{args.first}: first token "
          f"p50 {first * 1e3:.0f} ms, latency p50 {latency * 1e3:.0f} ms, "
          f"{len(out) * args.tokens / wall:.0f} tokens/s ({len(out)} requests)")


if __name__ == "__main__":
    main()
