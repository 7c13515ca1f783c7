"""One client against a running ``cospec serve``: the first N GSM8K heldout and N HumanEval
prompts, one request after another (chat, greedy, 96 new tokens, EOS ignored, k = 4), after
one untimed request. Writes each request's wall time, tokens, text and the server's metrics.

    python lone_client.py URL METHOD N OUT.json
"""
import json
import sys
import time

import httpx

from cospec.tasks import get_task

url, method, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
probs = get_task("gsm8k").problems("heldout")[:n] + get_task("humaneval").problems("test")[:n]


def ask(client: httpx.Client, text: str, tokens: int) -> dict:
    body = {"model": "qwen2.5-coder-1.5b", "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "method": method,
            "k": 4}
    return client.post(url + "/v1/chat/completions", json=body).json()


rows = []
with httpx.Client(timeout=600) as c:
    ask(c, "Say hi.", 8)  # untimed
    for p in probs:
        t0 = time.perf_counter()
        r = ask(c, p.prompt, 96)
        wall = time.perf_counter() - t0
        m = r["metrics"]
        rows.append({"id": p.id, "wall_s": wall, "tokens": r["usage"]["completion_tokens"],
                     "text": r["choices"][0]["message"]["content"],
                     **{k: m[k] for k in ("method", "decode_s", "prefill_s", "tau",
                                          "started_alone", "tokens_per_s")}})
        print(p.id, round(wall, 2), rows[-1]["tokens"], m["tau"], m["started_alone"], flush=True)
with open(out, "w") as f:
    json.dump(rows, f, indent=1)
tokens, wall = sum(r["tokens"] for r in rows), sum(r["wall_s"] for r in rows)
print(method, "total tok/s", round(tokens / wall, 2))
