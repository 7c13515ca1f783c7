#!/usr/bin/env bash
# cospec generate on the shipped pair (CPU, float32, k = 4, 128 new tokens, the default
# --draft-weights auto: the int8 draft): its default method (spd-staged) against --method
# spd, alternating, three prompts, twice each, each run its own process, nothing else
# running. One JSON line a run in runs.jsonl (with the load before it), then summary.json:
# totals and per-prompt paired ratios (decode time, prefill excluded).
set -euo pipefail
dir=$(dirname "$0")
out=$dir/runs.jsonl
: > "$out"
prompts=("Write a Python function that returns the n-th Fibonacci number."
         "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
         "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.")
for rep in 1 2; do
    for i in 0 1 2; do
        for m in default spd; do
            load=$(cut -d' ' -f1 /proc/loadavg)
            flag=(); [ "$m" = default ] || flag=(--method "$m")
            python3 -m cospec generate --prompt "${prompts[$i]}" --max-new-tokens 128 \
                "${flag[@]}" --json 2>/dev/null \
                | python3 -c "import json, sys
d = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(json.dumps({'asked': sys.argv[1], 'prompt': int(sys.argv[2]), 'rep': int(sys.argv[3]),
                  'load': float(sys.argv[4]), 'method': d['method'],
                  'draft_weights': d['draft_weights'], 'token_ids': d['token_ids'],
                  'stats': d['stats']}))" "$m" "$i" "$rep" "$load" >> "$out"
        done
    done
done
python3 - "$out" "$dir/summary.json" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
def total(asked):
    rs = [r for r in runs if r["asked"] == asked]
    tok = sum(r["stats"]["generated"] for r in rs)
    sec = sum(r["stats"]["decode_s"] for r in rs)
    return {"method": rs[0]["method"], "draft_weights": rs[0]["draft_weights"], "tokens": tok,
            "decode_s": sec, "tokens_per_s": tok / sec,
            "tau": statistics.mean(r["stats"]["tau"] for r in rs)}
pairs = [(a, b) for a in runs for b in runs if a["asked"] == "default" and b["asked"] == "spd"
         and (a["prompt"], a["rep"]) == (b["prompt"], b["rep"])]
ratios = [a["stats"]["tokens_per_s"] / b["stats"]["tokens_per_s"] for a, b in pairs]
d, s = total("default"), total("spd")
res = {"default": d, "spd": s, "total_ratio": d["tokens_per_s"] / s["tokens_per_s"],
       "paired_ratios": ratios, "median_paired_ratio": statistics.median(ratios),
       "same_tokens": sum(a["token_ids"] == b["token_ids"] for a, b in pairs),
       "pairs": len(pairs), "loads": [r["load"] for r in runs]}
open(sys.argv[2], "w").write(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if k != "loads"}, indent=1))
PY
