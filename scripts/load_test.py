"""A bounded load test of ``cospec serve`` on loopback.

Starts the server in-process (tiny random-weight models by default, or ``--target/--draft``)
and fires ``--requests`` requests, ``--concurrency`` at a time (asyncio + httpx): chat and
completions, streaming and not, methods target and spd (greedy), a share of clients that
disconnect after their first chunk, a share of slow readers, and a share of malformed
requests (each with the 4xx it must get).

Every prompt is unique (it holds the request number), and each completed response is
compared with the greedy output of the *target* for that prompt, computed beforehand by the
library's own loop, one request at a time: a lost, truncated or mixed-up response, or greedy
spd differing from target, shows up as a mismatch. Pass criteria: no mismatch, no lost
request, no 5xx, every malformed request answered with its 4xx, the server healthy and idle
afterwards. Writes ``load_test.json`` and ``load_test.md`` to ``--out``; exits 1 on failure.

``--concurrency 1,4,16,64`` runs the same requests at each level in turn (one table row
each); with ``--waves W`` a level of c clients sends max(--requests, W·c) of them, so that
the many-client levels last more than a wave or two. ``--url`` fires at a server already
running instead (``cospec serve``, or any OpenAI-compatible server such as vLLM with
``--plain``: OpenAI fields only, any 4xx counts as the rejection of a malformed request, no
``metrics`` expected); its responses are checked against references only when ``--target``
loads the same model here.

    python scripts/load_test.py --requests 200 --concurrency 8 --out results/server
``--warm-up`` first sends, untimed, c requests c at a time for each level c, so that
engines that capture CUDA graphs or compile on first use do so before the clock runs.
``--unchecked`` leaves the references out (speed runs in bf16: a batched row may part from
its batch-1 tokens at a near-tie, which is not a mixed-up response).

For speed beside another server, start ``cospec serve`` in its own process and use ``--url``
(``gpu_stages.sh xserve``): in-process, the clients and the server share one interpreter,
and the clients' work can delay the server's steps.

    python scripts/load_test.py --url http://127.0.0.1:8000 --plain --malformed 0 \
        --disconnect 0 --slow 0 --concurrency 1,4,16,64 --out results/server/vllm
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cospec.batch_scheduler import SPEC_OFF_AT, SPEC_OFF_METHODS  # noqa: E402
from cospec.methods import build_method, chat_ids, eos_ids, text_ids  # noqa: E402
from cospec.models import Pair, context_length  # noqa: E402
from cospec.sampling import GREEDY  # noqa: E402
from cospec.server import BackgroundServer, create_app  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
WORDS = ("the", "answer", "is", "42", "because", "6", "times", "7", "def", "return", "print",
         "hello", "world")


def tiny_pair() -> tuple[Pair, str]:
    """The tests' tiny Qwen2 (2 layers, width 32, byte-level BPE vocab 300, fp64) with a chat
    template; the draft is the target with 5 % Gaussian noise on every weight, so it is
    accepted often but not always."""
    from tiny import tiny_model, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    target = tiny_model(1, vocab=len(tok))
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05 * p.std())
    return (Pair(target, draft, tok, "tiny", "tiny-draft"),
            "tiny random Qwen2 (2 layers, width 32, vocab 300, fp64); draft = target + 5% noise")


def real_pair(args) -> tuple[Pair, str]:
    from cospec.models import load_pair, set_cpu_threads

    set_cpu_threads()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pair = load_pair(args.target, args.draft, args.device, dtype)
    return pair, f"target {args.target}, draft {args.draft}"


def malformed(i: int, model: str, ctx: int) -> tuple[str, bytes, int]:
    """(path, raw body, expected status) of the i-th malformed request (a cycle of kinds)."""
    base = {"model": model, "prompt": f"request {i}", "max_tokens": 8}
    kinds = [
        ("/v1/completions", b'{"model": "' + model.encode() + b'", "prompt": ', 400),
        ("/v1/completions", {**base, "model": "gpt-nope"}, 404),
        ("/v1/completions", {**base, "max_tokens": -1}, 400),
        ("/v1/completions", {**base, "max_tokens": 10**9}, 400),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user",
                                                                "content": "x"}],
                                  "temperature": "hot"}, 400),
        ("/v1/completions", {**base, "method": "nope"}, 400),
        ("/v1/completions", {**base, "prompt": "hello world " * ctx}, 400),
        ("/v1/chat/completions", {"model": model, "messages": "not a list"}, 400),
        ("/v1/completions", {**base, "frobnicate": True}, 400),
    ]
    path, body, status = kinds[i % len(kinds)]
    return path, body if isinstance(body, bytes) else json.dumps(body).encode(), status


def level_size(args, c: int) -> int:
    """The requests a level of ``c`` clients sends: --requests, or --waves times c if more
    (the first of the plan's)."""
    return max(args.requests, args.waves * c)


def plan(args, model: str, ctx: int) -> list[dict]:
    """The requests, in firing order (shuffled kinds, reproducible from --seed): as many as
    the largest level sends."""
    rng = random.Random(args.seed)
    total = max(level_size(args, c) for c in args.concurrency)
    n_bad = round(total * args.malformed)
    n_gone = round(total * args.disconnect)
    n_slow = round(total * args.slow)
    kinds = (["malformed"] * n_bad + ["disconnect"] * n_gone + ["slow"] * n_slow
             + ["ok"] * (total - n_bad - n_gone - n_slow))
    rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        req = {"i": i, "kind": kind, "endpoint": rng.choice(["chat", "completions"]),
               "stream": kind in ("disconnect", "slow") or rng.random() < 0.5,
               "method": "default" if args.plain else rng.choice(args.methods.split(",")),
               "k": rng.randint(*args.k),
               "prompt": f"request {i}: {words}"}
        if kind == "malformed":
            req["path"], req["raw"], req["expect"] = malformed(i, model, ctx)
        out.append(req)
    return out


def body_of(req: dict, model: str, max_tokens: int, plain: bool = False) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": req["stream"]}
    if not plain:
        body.update(method=req["method"], k=req["k"])
    if req["stream"]:
        body["stream_options"] = {"include_usage": True}
    if req["endpoint"] == "chat":
        body["messages"] = [{"role": "user", "content": req["prompt"]}]
    else:
        body["prompt"] = req["prompt"]
    return body


def references(pair: Pair, reqs: list[dict], max_tokens: int) -> None:
    """The target's greedy output for each generation request, one at a time (in place)."""
    method = build_method("target", pair)
    eos = eos_ids(pair.tokenizer, pair.target)
    for req in reqs:
        if req["kind"] == "malformed":
            continue
        ids = (chat_ids(pair.tokenizer, [{"role": "user", "content": req["prompt"]}])
               if req["endpoint"] == "chat" else text_ids(pair.tokenizer, req["prompt"]))
        out = method.run(ids, k=1, max_new_tokens=max_tokens, sampling=GREEDY,
                         eos_ids=eos)[0]
        req["ref_text"] = pair.tokenizer.decode(out, skip_special_tokens=True)
        req["ref_tokens"] = len(out)
        req["ref_finish"] = "stop" if out and out[-1] in eos else "length"


async def fire(client: httpx.AsyncClient, req: dict, model: str, max_tokens: int,
               slow_s: float, plain: bool = False) -> dict:
    """Send one request; returns its record (status, timings, what came back, verdict)."""
    rec = {k: req[k] for k in ("i", "kind", "endpoint", "stream", "method")}
    t0 = time.perf_counter()
    try:
        if req["kind"] == "malformed":
            r = await client.post(req["path"], content=req["raw"],
                                  headers={"content-type": "application/json"})
            rec["status"] = r.status_code
            err = r.json().get("error", {})
            rec["ok"] = (400 <= r.status_code < 500 if plain else
                         r.status_code == req["expect"] and bool(err.get("message")))
            rec["outcome"] = "rejected as expected" if rec["ok"] else "wrong status"
            return rec
        path = "/v1/chat/completions" if req["endpoint"] == "chat" else "/v1/completions"
        body = body_of(req, model, max_tokens, plain)
        if not req["stream"]:
            r = await client.post(path, json=body)
            rec["status"] = r.status_code
            data = r.json()
            if r.status_code == 200:
                choice = data["choices"][0]
                rec["text"] = choice["message"]["content"] if req["endpoint"] == "chat" \
                    else choice["text"]
                rec["finish"] = choice["finish_reason"]
                rec["tokens"] = data["usage"]["completion_tokens"]
                rec["metrics"] = data.get("metrics")
        else:
            async with client.stream("POST", path, json=body) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    await r.aread()
                else:
                    await read_stream(r, req, rec, t0, slow_s)
        rec["latency_s"] = time.perf_counter() - t0
        rec["ok"], rec["outcome"] = verdict(req, rec, plain)
    except Exception as err:  # a lost request
        rec.update(ok=False, outcome="lost", error=repr(err))
    rec.pop("text", None)
    return rec


async def read_stream(r: httpx.Response, req: dict, rec: dict, t0: float,
                      slow_s: float) -> None:
    pieces, ids, finals, done = [], set(), [], False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        ids.add(chunk.get("id"))
        if "error" in chunk:
            rec["error"] = chunk["error"]
            break
        if chunk.get("usage"):
            rec["tokens"] = chunk["usage"]["completion_tokens"]
            rec["metrics"] = chunk.get("metrics")
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta", {}).get("content") if req["endpoint"] == "chat"
                     else choice.get("text"))
            if piece:
                rec.setdefault("ttft_s", time.perf_counter() - t0)
                pieces.append(piece)
            if choice.get("finish_reason"):
                finals.append(choice["finish_reason"])
        if req["kind"] == "disconnect" and pieces:
            rec["disconnected"] = True
            return  # leaving the context closes the connection mid-stream
        if req["kind"] == "slow":
            await asyncio.sleep(slow_s)
    rec["text"] = "".join(pieces)
    rec["finish"] = finals[0] if len(finals) == 1 else f"{len(finals)} finish chunks"
    rec["stream_ok"] = done and len(ids) == 1


def verdict(req: dict, rec: dict, plain: bool = False) -> tuple[bool, str]:
    if rec.get("status") != 200:
        return False, f"status {rec.get('status')}"
    if req["kind"] == "disconnect":
        return (True, "disconnected") if rec.get("disconnected") else (True, "finished first")
    if req["stream"] and not rec.get("stream_ok"):
        return False, "broken stream"
    if "ref_text" not in req:
        return True, "ok"  # nothing to compare with (--url without --target)
    same = (rec.get("text") == req["ref_text"] and rec.get("tokens") == req["ref_tokens"]
            and rec.get("finish") == req["ref_finish"])
    m = rec.get("metrics") or {}
    sane = plain or (m.get("method") == req["method"]
                     and m.get("accepted", 0) <= m.get("drafted", 0) and m.get("tau", 0) >= 1)
    if not same:
        return False, "mismatch"
    return (True, "ok") if sane else (False, "bad metrics")


async def run(args, url: str, reqs: list[dict], model: str) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.client_timeout,
                                 limits=limits) as client:

        async def one(req):
            async with sem:
                return await fire(client, req, model, args.max_tokens, args.slow_s, args.plain)

        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(r) for r in reqs))
        return list(recs), time.perf_counter() - t0


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(recs: list[dict], wall: float, health: dict, reqs: list[dict]) -> dict:
    by_outcome: dict[str, int] = {}
    by_status: dict[str, int] = {}
    for r in recs:
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
        by_status[str(r.get("status"))] = by_status.get(str(r.get("status")), 0) + 1
    done = [r for r in recs if r["outcome"] == "ok"]
    fast = [r["latency_s"] for r in done if r["kind"] == "ok"]
    slow = [r["latency_s"] for r in done if r["kind"] == "slow"]
    ttft = [r["ttft_s"] for r in done if r["kind"] == "ok" and "ttft_s" in r]
    spd = [r["metrics"] for r in done  # spd and lookup: --spec-off-at's methods
           if r["method"] in SPEC_OFF_METHODS and r.get("metrics")]
    off = [m for m in spd if m.get("speculation_off")]  # run target-only under load
    taus = [m["tau"] for m in spd if not m.get("speculation_off")]
    tokens = sum(r["tokens"] for r in done)
    refs = [q["ref_text"] for q in reqs if q["kind"] in ("ok", "slow") and "ref_text" in q]
    return {
        "requests": len(recs), "wall_s": wall, "outcomes": by_outcome, "statuses": by_status,
        "lost": by_outcome.get("lost", 0),
        "mismatched": sum(by_outcome.get(k, 0) for k in ("mismatch", "broken stream",
                                                          "bad metrics", "wrong status")),
        "server_errors_5xx": sum(n for s, n in by_status.items() if s.startswith("5")),
        "completed": len(done), "distinct_reference_outputs": len(set(refs)),
        "latency_n": len(fast),
        "latency_p50_s": pct(fast, 50), "latency_p99_s": pct(fast, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "slow_reader_latency_p50_s": pct(slow, 50),
        "throughput_requests_per_s": len(recs) / wall,
        "throughput_completed_per_s": len(done) / wall,
        "throughput_tokens_per_s": tokens / wall, "completion_tokens": tokens,
        "spd_mean_tau": float(np.mean(taus)) if taus else None,
        "spd_off_share": len(off) / len(spd) if spd else None,
        "alone_share": (sum(bool((r.get("metrics") or {}).get("started_alone")) for r in done)
                        / len(done) if done else None),
        "health_after": health,
    }


def report(cfg: dict, levels: list[dict], passed: bool, failures: list[str]) -> str:
    """The markdown report: one row per concurrency level in each table."""
    def f(x, unit="s"):
        return "—" if x is None else (f"{x * 1000:.0f} ms" if unit == "s" else f"{x:.2f}")

    def share(x):
        return "—" if x is None else f"{x:.0%}"

    server = (f"`{cfg['url']}`" if cfg["url"] else
              f"in-process, max_batch {cfg['max_batch']}, max_context "
              f"{cfg['max_context'] or 'default'}, max_active {cfg['max_active']}, max_queue "
              f"{cfg['max_queue']}, spec_off_at {cfg['spec_off_at']}, lone requests "
              f"{'alone' if cfg.get('solo', True) else 'batched'}")
    k = cfg["k"][0] if cfg["k"][0] == cfg["k"][1] else f"{cfg['k'][0]}–{cfg['k'][1]}"
    lines = [
        "# `cospec serve` load test", "",
        f"Command: `{cfg['command']}`", "",
        f"Models: {cfg['models']}. Machine: {cfg['machine']}. Server: {server}; greedy, "
        f"max_tokens {cfg['max_tokens']}, "
        + ("the server's default method" if cfg["plain"] else f"methods {cfg['methods']} (k {k})")
        + ", chat and completions, streaming and not.",
        "",
        f"**{'PASS' if passed else 'FAIL'}**" + ("" if passed else ": " + "; ".join(failures)),
        "",
        "| concurrent | requests | wall | lost | mixed-up / wrong | 5xx | completed |",
        "|---|---|---|---|---|---|---|",
        *(f"| {lv['concurrency']} | {s['requests']} | {s['wall_s']:.1f} s | {s['lost']} | "
          f"{s['mismatched']} | {s['server_errors_5xx']} | {s['completed']} |"
          for lv in levels for s in [lv["summary"]]), "",
        "| concurrent | latency p50 | latency p99 | first token p50 | first token p99 | "
        "requests/s | completed/s | tokens/s | spd/lookup mean τ | spd/lookup target-only | "
        "started alone | "
        "engine stepping | worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {lv['concurrency']} | {f(s['latency_p50_s'])} | {f(s['latency_p99_s'])} | "
          f"{f(s['ttft_p50_s'])} | {f(s['ttft_p99_s'])} | "
          f"{s['throughput_requests_per_s']:.1f} | {s['throughput_completed_per_s']:.1f} | "
          f"{s['throughput_tokens_per_s']:.1f} | {f(s['spd_mean_tau'], '')} | "
          f"{share(s.get('spd_off_share'))} | {share(s.get('alone_share'))} | "
          f"{share(s.get('engine_step_share'))} | {share(s.get('batch_worker_share'))} |"
          for lv in levels for s in [lv["summary"]]), "",
    ]
    s = levels[-1]["summary"]
    lines += [
        f"Outcomes at concurrency {levels[-1]['concurrency']}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items()))
        + ". HTTP statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))
        + ".", "",
        f"Latency is over the {s['latency_n']} plain requests answered in full "
        "(request sent → last byte), slow readers (who sleep "
        f"{cfg['slow_s'] * 1000:.0f} ms per chunk; p50 {f(s['slow_reader_latency_p50_s'])}) "
        "and disconnecting clients excluded; tokens/s counts the completion tokens of "
        "completed requests over the wall time. "
        + (f"Every completed response equals the target's greedy output for its own prompt, "
           "computed beforehand one request at a time "
           f"({s['distinct_reference_outputs']} distinct outputs among the prompts)."
           if cfg["checked"] else "Responses were not compared with references."), "",
        "spd/lookup mean τ is over the spd and prompt-lookup requests that kept speculating; "
        "spd/lookup target-only is the share of those completed that the server ran "
        "target-only under load (`--spec-off-at`).", "",
        "Engine stepping / worker: the share of each level's wall time that cospec serve's "
        "worker thread spent in its batch engines' steps / on its batch turns in all (the "
        "steps and detokenizing; from /health); in the rest of it no engine stepped (the "
        "event loop's work, and waiting for requests).", "",
        f"Server afterwards: `{json.dumps(s['health_after'])}`", "",
    ]
    return "\n".join(lines)


def busy(before: dict, after: dict, wall: float) -> dict:
    """The shares of a level's wall time that cospec serve's worker spent stepping its batch
    engines (``engine_step_share``) and on its batch turns in all (``batch_worker_share``:
    the steps and the detokenizing), from /health before and after; in the rest no engine
    stepped (the event loop's work, and waiting for requests). Empty for a server that does
    not report them."""
    keys = ("engine_step_s", "batch_worker_s")
    if wall <= 0 or not all(k in before and k in after for k in keys):
        return {}
    return {k[:-2] + "_share": (after[k] - before[k]) / wall for k in keys}


def idle_health(url: str) -> dict:
    """The server's /health once nothing is active or queued (cancelled requests leave at
    their next turn), or after 30 s ({} from a server without /health)."""
    t1 = time.monotonic()
    while True:
        r = httpx.get(url + "/health")
        if r.status_code != 200 or "active" not in r.text:
            return {}
        health = r.json()
        if (health["active"] == 0 and health["queued"] == 0) or time.monotonic() - t1 > 30:
            return health
        time.sleep(0.05)


def sweep(args, url: str, reqs: list[dict], model: str) -> tuple[list[dict], list[str]]:
    """Every concurrency level in turn against ``url``; (levels, failures)."""
    levels, failures = [], []
    warm = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": "warm up", "max_tokens": 4, "temperature": 0})
    assert warm.status_code == 200, warm.text
    plain = [r for r in reqs if r["kind"] == "ok"]

    def at(c: int, some: list[dict]) -> tuple[list[dict], float]:
        return asyncio.run(run(argparse.Namespace(**{**vars(args), "concurrency": c}), url,
                               some, model))

    for c in args.concurrency if args.warm_up else ():  # untimed: c requests c at a time
        at(c, plain[:c])
    before = idle_health(url)
    for c in args.concurrency:
        some = reqs[:level_size(args, c)]
        recs, wall = at(c, some)
        health = idle_health(url)
        s = {**summarize(recs, wall, health, some), **busy(before, health, wall)}
        before = health
        bad = []
        if s["lost"]:
            bad.append(f"{s['lost']} lost")
        if s["mismatched"]:
            bad.append(f"{s['mismatched']} mismatched or wrongly rejected")
        if s["server_errors_5xx"]:
            bad.append(f"{s['server_errors_5xx']} 5xx")
        if health and (health.get("status") != "ok" or health["active"] or health["queued"]
                       or health["errors"]):
            bad.append("server not healthy and idle afterwards")
        failures += [f"concurrency {c}: {b}" for b in bad]
        levels.append({"concurrency": c, "summary": s, "requests": recs})
    last = at(1, plain[:1])
    if last[0][0]["outcome"] != "ok":
        failures.append("a request after the load failed")
    return levels, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="real target (default: tiny test models)")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--url", default=None, help="a running server to load (default: start one)")
    ap.add_argument("--model", default=None, help="with --url: the model id to send "
                                                  "(default: the server's first)")
    ap.add_argument("--plain", action="store_true",
                    help="OpenAI fields only (no method, k): for servers other than cospec")
    ap.add_argument("--label", default=None, help="this run's name in plot_throughput.py")
    ap.add_argument("--warm-up", action="store_true",
                    help="before the timed levels, an untimed round of c requests at each "
                         "concurrency c (CUDA graphs and compilation happen there)")
    ap.add_argument("--unchecked", action="store_true",
                    help="no reference outputs (a speed run in bf16, where a batched row may "
                         "part from its batch-1 tokens at a near-tie)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--waves", type=int, default=0,
                    help="a level of c clients sends at least this many times c requests "
                         "(more than --requests where c is large: 128 requests at 64 clients "
                         "are two waves, about a second on a GPU)")
    ap.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")],
                    default=[8], help="requests in flight, or a list: 1,4,16,64")
    ap.add_argument("--methods", default="target,spd", help="methods requests pick from")
    ap.add_argument("--k", type=lambda v: tuple(int(x) for x in (v.split("-") * 2)[:2]),
                    default=(1, 6), help="draft length per request: N, or A-B at random")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--disconnect", type=float, default=0.1, help="share leaving mid-stream")
    ap.add_argument("--malformed", type=float, default=0.1, help="share of bad requests")
    ap.add_argument("--slow", type=float, default=0.05, help="share of slow stream readers")
    ap.add_argument("--slow-s", type=float, default=0.02, help="a slow reader's pause/chunk")
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--spec-off-at", type=int, default=SPEC_OFF_AT,
                    help="the server's: spd and lookup requests arriving while this many "
                         "would decode run target-only (0: never)")
    ap.add_argument("--no-solo", dest="solo", action="store_false",
                    help="the server's: a lone greedy spd / cospec / cos-we request takes the "
                         "batch engines too (default: the batch-1 path until others arrive)")
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--client-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/server")
    args = ap.parse_args()
    if args.spec_off_at < 0:
        ap.error(f"--spec-off-at must be >= 0, got {args.spec_off_at}")
    if args.waves < 0:
        ap.error(f"--waves must be >= 0, got {args.waves}")

    pair, label = (None, "") if args.url and not args.target else \
        real_pair(args) if args.target else tiny_pair()
    if args.url:
        model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
        label = label or f"served by {args.url} ({model})"
        ctx = 1 << 16  # a prompt longer than most models' context
    else:
        model, ctx = pair.target_name, context_length(pair)
    reqs = plan(args, model, ctx)
    t0 = time.perf_counter()
    if pair is not None and not args.unchecked:
        references(pair, reqs, args.max_tokens)
    ref_s = time.perf_counter() - t0
    if args.url:
        levels, failures = sweep(args, args.url, reqs, model)
    else:
        app = create_app(pair, methods=args.methods.split(","), max_active=args.max_active,
                         max_queue=args.max_queue, timeout=args.client_timeout,
                         max_batch=args.max_batch, max_context=args.max_context,
                         spec_off_at=args.spec_off_at, solo=args.solo)
        with BackgroundServer(app) as srv:
            levels, failures = sweep(args, srv.url, reqs, model)
    passed = not failures
    cfg = {"command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)]
                                              + sys.argv[1:]),
           "models": label, "checked": pair is not None and not args.unchecked,
           "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch "
                      f"{torch.__version__}, {torch.get_num_threads()} torch thread(s)"
                      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
                      + f", load {os.getloadavg()[0]:.2f} at the end",
           "reference_s": ref_s, **{k: v for k, v in vars(args).items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_test.json").write_text(json.dumps(
        {"config": cfg, "passed": passed, "failures": failures, "levels": levels},
        indent=1) + "\n")
    (out / "load_test.md").write_text(report(cfg, levels, passed, failures))
    print(report(cfg, levels, passed, failures))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
