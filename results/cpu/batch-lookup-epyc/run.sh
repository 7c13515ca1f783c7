#!/usr/bin/env bash
# Batched prompt lookup beside target-only on a 2-core CPU (the shipped pair, float32):
# bench_batch.json and bench_batch.log (its printed rows) here. Run from the repository root,
# nothing else running.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
OMP_NUM_THREADS=2 python3 scripts/bench_batch.py --out "$dir" --task gsm8k,humaneval \
    --prompts 8 --new 64 --k 4 --batches 1,4 --methods target,lookup --ignore-eos \
    2>&1 | grep 'B=' > "$dir/bench_batch.log"
