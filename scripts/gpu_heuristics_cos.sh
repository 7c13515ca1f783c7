#!/usr/bin/env bash
# GPU runs (after scripts/gpu_pipeline.sh): hidden states at the collected dev
# points, the CoSpec heuristics on GSM8K heldout, CoS accuracy (GSM8K, HumanEval; T=0 and 1),
# MBPP transfer. Same set-up as gpu_pipeline.sh (GGUFs + data wheels in $COSPEC_CACHE); run
# from the repository root. Every stage resumes where it stopped.
set -u
R=${RESULTS:-/tmp/work/results}
B=${BATCH:-512}
N=${MAX_NEW:-768}
mkdir -p "$R"
for d in results/gpu/*/; do  # resume the committed folders (their records are gzipped)
    n=$(basename "$d")
    if [ -e "$d/accuracy.jsonl.gz" ] && [ ! -e "$R/$n/accuracy.jsonl" ]; then
        cp -r "$d" "$R/" && gunzip "$R/$n/accuracy.jsonl.gz"
    fi
done
run() { echo "=== $(date +%T) $*"; python3 -m cospec "$@" --device ${DEVICE:-cuda} 2>&1 | grep -v -E "it/s\]|s/it\]|problem/s\]|seq/s\]|Loading weights" ; }
if [ -n "${HIDDEN:-}" ]; then  # hidden states at the dev points (analysis: results/cospec)
    python3 scripts/hidden_at_points.py --data data/divergences-gsm8k-dev \
        --out "$R/hidden-gsm8k-dev" --batch-size $B
fi
COS=target,we,we-sd,cos-we,cd,cd-sd,cos-cd
cos_eval() {  # $1 = temperature
    run eval --task gsm8k --split heldout --limit 200 --methods $COS --k 5 --temperature $1 \
        --max-new-tokens $N --batch-size $B --out "$R/cos-gsm8k-T$1"
    run eval --task humaneval --split test --methods $COS --k 5 --temperature $1 \
        --max-new-tokens 512 --batch-size $B --out "$R/cos-humaneval-T$1"
}
if [ -n "${ONLY_T:-}" ]; then cos_eval "$ONLY_T"; exit; fi  # just the CoS runs at one T
cos_eval 0
run eval --task gsm8k --split heldout --methods target,confidence,entropy --max-new-tokens $N \
    --batch-size $B --out "$R/gsm8k-heldout"
run eval --task mbpp --split test --methods target,spd,cospec --max-new-tokens 512 \
    --batch-size $B --out "$R/mbpp"
cos_eval 1
echo "=== $(date +%T) runs done"
# batch-1 speed on the GPU (eager HF forward passes; arbiter share of decode time)
run eval --task gsm8k --split heldout --limit 10 --speed-subset 10 --methods target,spd,cospec \
    --max-new-tokens 256 --batch-size 10 --out "$R/gpu-b1-gsm8k"
echo "=== $(date +%T) batch-1 done"
