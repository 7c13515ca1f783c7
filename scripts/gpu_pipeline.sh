#!/usr/bin/env bash
# The GPU run behind results/gpu/: accuracy on GSM8K heldout, divergence collection on GSM8K
# dev, arbiter training, CoSpec and heuristics on heldout, transfer to HumanEval and MBPP.
# Runs on the device machine after the shipped GGUF files and data wheels are placed in
# $COSPEC_CACHE (see scripts/device_setup.sh). Every stage resumes where it stopped.
set -u
R=${RESULTS:-/tmp/work/results}
B=${BATCH:-512}
N=${MAX_NEW:-768}
mkdir -p "$R"
run() { echo "=== $(date +%T) $*"; python3 -m cospec "$@" --device ${DEVICE:-cuda} ${MODELS:-} 2>&1 | grep -v -E "it/s\]|s/it\]|problem/s\]|seq/s\]" ; }
run collect --task gsm8k --split dev --max-new-tokens $N --max-points ${POINTS:-6} \
    --batch-size $B --shard-size 250 --out "$R/divergences-gsm8k-dev"
echo "=== $(date +%T) train"
python3 -m cospec train --data "$R/divergences-gsm8k-dev" --out "$R/arbiter.safetensors"
run eval --task gsm8k --split heldout --methods target,draft,spd,cospec \
    --arbiter "$R/arbiter.safetensors" --max-new-tokens $N --batch-size $B \
    --out "$R/gsm8k-heldout"
run eval --task humaneval --split test --methods target,draft,spd,cospec \
    --arbiter "$R/arbiter.safetensors" --max-new-tokens 512 --batch-size $B \
    --out "$R/humaneval"
run eval --task gsm8k --split heldout --methods target,draft,spd,cospec,confidence,entropy \
    --arbiter "$R/arbiter.safetensors" --max-new-tokens $N --batch-size $B \
    --out "$R/gsm8k-heldout"
run eval --task mbpp --split test --methods target,draft,spd,cospec \
    --arbiter "$R/arbiter.safetensors" --max-new-tokens 512 --batch-size $B \
    --out "$R/mbpp"
echo "=== $(date +%T) pipeline done"
