#!/usr/bin/env bash
# cospec beside llama.cpp on a 2-core Xeon, batch 1, every engine warmed up alike (the
# longest prompt, then every prompt, untimed), each engine and method in its own process,
# one after the other, nothing else running. Run from the repository root; xllamacpp with
#   pip install --no-deps --target /tmp/xl xllamacpp==2026.10.11549
set -eu
D=results/cpu/peers-b1-xeon-same-warm-up
export OMP_NUM_THREADS=2
for run in "cospec target" "llamacpp target" "cospec spd --draft-weights model,int8" "llamacpp spd"; do
    set -- $run
    PYTHONPATH=scripts:/tmp/xl python scripts/peer_speed.py run --engine "$1" --method "$2" \
        --prompts $D/prompts.json --new 64 --k 4 --device cpu --threads 2 "${@:3}" \
        --out "$D/$1-$2.json"
done
python scripts/peer_speed.py table $D
