"""Where a served request's time goes, from the per-request metrics cospec serve returns.

    python scripts/serve_breakdown.py [NAME=]load_test.json [...]

One row per run and concurrency level (scripts/load_test.py's output against cospec serve):
tokens/s, first token p50, and the medians over requests of the server's own split of a
request's time (``metrics`` in each response): queue (waiting for a slot), prefill (the step
it joined in: its own admission and any admitted with it), decode per token (the steps it
took part in, less their admissions), and the rest: total - queue - prefill - decode, the time
the request spent waiting while the engine admitted later requests or between steps. Beside
them, the share of the level's wall time the server's worker spent stepping its engines
(``engine_step_share``, from /health; — where the run predates it).
Requests without metrics (a peer's server) are skipped; a run with none is named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def rows(data: dict) -> list[dict]:
    """One dict per concurrency level: tokens_per_s, ttft_p50_ms, and the medians (ms)."""
    out = []
    for level in data["levels"]:
        reqs = [r for r in level["requests"] if r.get("metrics")]
        if not reqs:
            continue
        m = [r["metrics"] for r in reqs]
        tokens = sum(r["tokens"] for r in reqs)
        rest = [x["total_s"] - x["queue_s"] - x["prefill_s"] - x["decode_s"] for x in m]
        ttft = level["summary"].get("ttft_p50_s")
        out.append({
            "concurrency": level["concurrency"],
            "tokens_per_s": level["summary"]["throughput_tokens_per_s"],
            "ttft_p50_ms": None if ttft is None else 1e3 * ttft,
            "queue_ms": 1e3 * statistics.median(x["queue_s"] for x in m),
            "prefill_ms": 1e3 * statistics.median(x["prefill_s"] for x in m),
            "decode_ms_per_token": 1e3 * sum(x["decode_s"] for x in m) / max(tokens, 1),
            "rest_ms": 1e3 * statistics.median(rest),
            "engine_step_share": level["summary"].get("engine_step_share"),
            "requests": len(reqs),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="[NAME=]load_test.json")
    args = ap.parse_args()
    print("| run | clients | tokens/s | first token p50 | queue | prefill | decode / token "
          "| rest | engine stepping | requests |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in args.files:
        name, path = arg.split("=", 1) if "=" in arg else ("", arg)
        if not Path(path).is_file():
            sys.exit(f"no such file: {path}")
        got = rows(json.loads(Path(path).read_text()))
        if not got:
            sys.exit(f"{path}: no request carries cospec's metrics (not a cospec server?)")
        for r in got:
            ttft = "—" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.0f} ms"
            share = "—" if r["engine_step_share"] is None else f"{r['engine_step_share']:.0%}"
            print(f"| {name or path} | {r['concurrency']} | {r['tokens_per_s']:,.0f} | {ttft} "
                  f"| {r['queue_ms']:.1f} ms | {r['prefill_ms']:.1f} ms "
                  f"| {r['decode_ms_per_token']:.2f} ms | {r['rest_ms']:.0f} ms "
                  f"| {share} | {r['requests']} |")


if __name__ == "__main__":
    main()
