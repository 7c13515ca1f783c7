"""One client against a running ``cospec serve``, one request after another: the first N
GSM8K heldout and the first N HumanEval prompts through the chat template, greedy, a fixed
number of new tokens (EOS ignored), after one untimed request. What a server's only user
gets, on real prompts (``load_test.py`` loads a server with many clients and word-salad
prompts). Writes each request's wall time, tokens, text and the server's ``metrics``.

    python scripts/lone_client.py --url http://127.0.0.1:8000 --method spd --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from cospec.tasks import get_task


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def ask(client: httpx.Client, args, text: str, tokens: int) -> dict:
    """One chat request's JSON answer; SystemExit naming the server's error otherwise."""
    body = {"model": args.model, "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "method": args.method, "k": args.k}
    try:
        r = client.post(args.url + "/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        raise SystemExit(f"lone_client.py: no answer from {args.url}: {err}") from None
    if r.status_code != 200:
        raise SystemExit(f"lone_client.py: {args.url} answered {r.status_code}: {r.text[:500]}")
    return r.json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--method", default="spd")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--prompts", type=positive, default=3, help="N of each task")
    p.add_argument("--tokens", type=positive, default=96)
    p.add_argument("--k", type=positive, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    probs = (get_task("gsm8k").problems("heldout")[:args.prompts]
             + get_task("humaneval").problems("test")[:args.prompts])
    rows = []
    with httpx.Client(timeout=600) as client:
        ask(client, args, "Say hi.", 8)  # untimed
        for prob in probs:
            t0 = time.perf_counter()
            r = ask(client, args, prob.prompt, args.tokens)
            wall = time.perf_counter() - t0
            m = r["metrics"]
            rows.append({"id": prob.id, "wall_s": wall,
                         "tokens": r["usage"]["completion_tokens"],
                         "text": r["choices"][0]["message"]["content"],
                         **{k: m[k] for k in ("method", "decode_s", "prefill_s", "tau",
                                              "started_alone", "tokens_per_s")}})
            print(prob.id, round(wall, 2), rows[-1]["tokens"], m["tau"], m["started_alone"],
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    tokens, wall = sum(r["tokens"] for r in rows), sum(r["wall_s"] for r in rows)
    print(args.method, "total tok/s", round(tokens / wall, 2))


if __name__ == "__main__":
    main()
