#!/usr/bin/env bash
# The batch engine's fused rows, three ways on one machine, real pair, 2 and 3 rows, k = 4:
# every step of b * n <= 16 tokens fused (this tree), decode steps only (fast_batch.py of
# d80368b), none (COSPEC_FUSED_ROWS=0); then this tree again. Run from the repository root
# with R (output folder) set and the old file in place:
#   mkdir -p .dev-old && git show d80368b:cospec/fast_batch.py > .dev-old/fast_batch.py
set -u
REPO=$PWD
rm -rf /tmp/old && cp -r "$REPO" /tmp/old && rm -rf /tmp/old/.dev-* && cp .dev-old/fast_batch.py /tmp/old/cospec/
bench() {  # $1 tree, $2 output folder, then env
    local tree=$1 out=$2; shift 2
    [ -e "$out/bench_batch.json" ] && return 0
    (cd "$tree" && env "$@" PYTHONPATH=/tmp/site:$tree python3 scripts/bench_batch.py --out "$out" \
        --task gsm8k,humaneval --prompts 32 --new 256 --k 4 --ignore-eos --batches 2,3 \
        --methods target,spd,lookup) 2>&1 | tail -8
    echo "$(date +%T) done $out load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$R/queue.log"
}
bench "$REPO" "$R/rows-verify-fused" X=1
bench /tmp/old "$R/rows-decode-fused" X=1
bench "$REPO" "$R/rows-halves" COSPEC_FUSED_ROWS=0
bench "$REPO" "$R/rows-verify-fused-again" X=1
touch "$R/ab.done"
