#!/usr/bin/env bash
# The README's first command (line 4) on a fresh clone of REPO (default: this checkout), in a
# new venv under /tmp with empty cospec, pip and Hugging Face caches, timed end to end; each
# output line stamped with the time, into /tmp/fresh/log:
#
#   bash results/cpu/demo-fresh-clone-epyc/run.sh [REPO]
set -euo pipefail
repo=$(realpath "${1:-$(dirname "$0")/../../..}")
rm -rf /tmp/fresh && mkdir -p /tmp/fresh/{cc,pip,hf}
git clone -q "$repo" /tmp/fresh/cospec
cd /tmp/fresh/cospec
python3 -m venv venv && source venv/bin/activate
export COSPEC_CACHE=/tmp/fresh/cc PIP_CACHE_DIR=/tmp/fresh/pip HF_HOME=/tmp/fresh/hf
{
    echo "load start: $(cat /proc/loadavg)"
    cmd=$(sed -n 4p README.md)
    echo "CMD: $cmd"
    time bash -c "$cmd"
    echo "load end: $(cat /proc/loadavg)"
} 2>&1 | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done \
    > /tmp/fresh/log
