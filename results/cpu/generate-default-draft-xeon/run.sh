#!/usr/bin/env bash
# cospec generate on the shipped pair (CPU, float32, spd: generate's default method when this
# ran, named since; k = 4, 128 new tokens): its default
# --draft-weights auto against --draft-weights model, alternating, three prompts, twice each.
# One JSON line a run in runs.jsonl (with the load before it); nothing else running.
set -euo pipefail
out=$(dirname "$0")/runs.jsonl
: > "$out"
prompts=("Write a Python function that returns the n-th Fibonacci number."
         "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
         "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.")
for rep in 1 2; do
    for i in 0 1 2; do
        for w in auto model; do
            load=$(cut -d' ' -f1 /proc/loadavg)
            python3 -m cospec generate --prompt "${prompts[$i]}" --max-new-tokens 128 \
                --method spd --draft-weights "$w" --json 2>/dev/null \
                | python3 -c "import json, sys
d = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(json.dumps({'asked': sys.argv[1], 'prompt': int(sys.argv[2]), 'rep': int(sys.argv[3]),
                  'load': float(sys.argv[4]), 'draft_weights': d['draft_weights'],
                  'token_ids': d['token_ids'], 'stats': d['stats']}))" "$w" "$i" "$rep" "$load" >> "$out"
        done
    done
done
