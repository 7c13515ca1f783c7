#!/usr/bin/env bash
# Tensor-parallel step times on an nvidia-h200-x2 machine (2 H200 GPUs, NVLink), as JSON:
#
#   tp2-72b.json        Qwen2.5-72B shapes at TP=2 (random weights: 72B in bf16 does not fit
#                       one GPU), beside the HBM roofline of the bytes one rank reads per step
#   tp1-7b.json         Qwen2.5-7B shapes at TP=1 ...
#   tp2-7b.json         ... and at TP=2 (same prefix, same forward lengths)
#   tp2-7b-eager.json   TP=2 without CUDA graphs / compile: the baseline for the captured path,
#                       and the fallback if capturing NCCL collectives fails on this machine
#   generate-tpN-METHOD.json  the real 1.5B target, greedy target-only and spd, at TP=1 and
#                       TP=2: same tokens expected (bf16 may differ in rare ties); only once the CLI
#                       has --tp (docs/tensor-parallel.md), skipped otherwise
#
# Each file: median / min / max seconds of a forward over 1 token (a decode step) and 5 tokens
# (a verify at k=4) after 512 cached tokens, bytes per rank and step, roofline seconds and
# their ratio. Results go to $R (default /tmp/tp) and are copied to $OUT when set. Run from
# the repository root: PYTHONPATH=. bash scripts/gpu_tp.sh
set -eu
R=${R:-/tmp/tp}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0   # NVLink multicast off on these machines
COMMON=(--dtype bfloat16 --prefix 512 --tokens 1,5 --warmup 5 --reps 50 --bandwidth 4.8e12)

tp() {  # tp N ARGS...: python -m cospec.tp on N ranks
    local n=$1
    shift
    torchrun --standalone --nproc-per-node "$n" -m cospec.tp --tp "$n" "${COMMON[@]}" "$@"
}

tp 2 --shape 72b --out "$R/tp2-72b.json"
tp 1 --shape 7b --out "$R/tp1-7b.json"
tp 2 --shape 7b --out "$R/tp2-7b.json"
tp 2 --shape 7b --eager --out "$R/tp2-7b-eager.json"

if python -m cospec generate --help | grep -q -- "--tp"; then
    for n in 1 2; do
        for method in target spd; do
            torchrun --standalone --nproc-per-node "$n" -m cospec generate --tp "$n" \
                --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --method "$method" \
                --k 4 --draft-weights model --max-new-tokens 256 --json --prompt "Write a Python function that \
returns the n-th Fibonacci number, with a docstring and two tests." \
                > "$R/generate-tp$n-$method.json"
        done
    done
fi

if [ -n "${OUT:-}" ]; then
    cp "$R"/*.json "$OUT"/
fi
