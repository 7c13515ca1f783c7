"""Where a served request waits, with engine steps as long as a GPU's.

cospec serve in-process on the tests' tiny models, each batch-engine step stretched to at
least ``--step`` seconds by a sleep (which releases the GIL, as a CUDA wait does), 4 streaming
clients in a closed loop, 12 requests each, 48 tokens (EOS ignored), after one untimed round.
``--encode`` says where prompts are encoded: ``worker`` (on the decode worker, queued behind
the running step: how cospec serve did it before) or ``own`` (on their own thread with a copy
of the tokenizer, as now).

    PYTHONPATH=. python scripts/serve_step_sim.py --encode own --step 0.02

Prints first-token and latency medians. A simulation of the scheduling, not a speed figure:
on the CPU the tiny model's own step takes about a millisecond.
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
from cospec.fast_batch import BatchEngine  # noqa: E402
from cospec.server import BackgroundServer, create_app  # noqa: E402

CLIENTS, REQUESTS, TOKENS = 4, 12, 48


def stretch(step_s: float) -> None:
    """Every BatchEngine step lasts at least ``step_s`` seconds from now on."""
    real = BatchEngine.step

    def slow(self):
        t0 = time.perf_counter()
        out = real(self)
        time.sleep(max(0.0, step_s - (time.perf_counter() - t0)))
        return out

    BatchEngine.step = slow


def encode_on_worker() -> None:
    """Prompts encoded on the decode worker, behind its running step (the earlier server)."""
    async def on_worker(self, fn):
        return await self.on_worker(fn, self.tokenizer)

    scheduler.Engine.encode = on_worker


async def client(url: str, i: int, out: list[tuple[float, float]]) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        for j in range(REQUESTS):
            t0, first = time.perf_counter(), None
            async with c.stream("POST", url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"client {i} request {j} hello",
                    "max_tokens": TOKENS, "temperature": 0, "stream": True,
                    "ignore_eos": True}) as r:
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter() - t0
            out.append((first, time.perf_counter() - t0))


async def load(url: str) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    await asyncio.gather(*(client(url, i, out) for i in range(CLIENTS)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encode", choices=("worker", "own"), required=True)
    ap.add_argument("--step", type=float, default=0.02, help="seconds a step lasts at least")
    args = ap.parse_args()
    if not 0 <= args.step <= 1:
        ap.error("--step is in seconds, 0 to 1")
    stretch(args.step)
    if args.encode == "worker":
        encode_on_worker()
    pair, _ = tiny_pair()
    app = create_app(pair, methods=["target"], max_batch=16, max_queue=64)
    with BackgroundServer(app) as srv:
        asyncio.run(load(srv.url))  # untimed
        out = asyncio.run(load(srv.url))
    first = statistics.median(a for a, _ in out)
    latency = statistics.median(b for _, b in out)
    print(f"encode {args.encode:6s} step {args.step * 1e3:.0f} ms: first token p50 "
          f"{first * 1e3:.0f} ms, latency p50 {latency * 1e3:.0f} ms ({len(out)} requests)")


if __name__ == "__main__":
    main()
