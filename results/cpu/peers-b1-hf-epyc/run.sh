#!/usr/bin/env bash
# cospec beside transformers' generate on a 2-core CPU, batch 1: each engine and method in its
# own process, one after the other, nothing else running. Resumes: a finished run's JSON is
# kept. From the repository root: bash results/cpu/peers-b1-hf-epyc/run.sh
set -eu
D=results/cpu/peers-b1-hf-epyc
[ -e $D/prompts.json ] || python scripts/peer_speed.py prompts --task gsm8k,humaneval --n 3 \
    --out $D/prompts.json
run() {  # $1 engine, $2 method, $3 file name, then more flags
    local engine=$1 method=$2 name=$3; shift 3
    [ -e "$D/$name.json" ] && return
    echo "=== $(date +%T) $name, load $(cut -d' ' -f1-3 /proc/loadavg)"
    python scripts/peer_speed.py run --engine "$engine" --method "$method" \
        --prompts $D/prompts.json --new 64 --k 4 --device cpu --threads 2 \
        --out "$D/$name.json" "$@"
}
run cospec target cospec-target
run cospec spd cospec-spd --draft-weights model
run cospec spd cospec-spd-int8 --draft-weights int8
run cospec spd-staged cospec-spd-staged-int8 --draft-weights int8
run cospec lookup cospec-lookup
run hf target hf-target --eager
run hf spd hf-spd
run hf lookup hf-lookup
python scripts/peer_speed.py table $D
