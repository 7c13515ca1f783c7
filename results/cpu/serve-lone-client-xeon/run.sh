#!/usr/bin/env bash
# A lone client of cospec serve on a 2-core CPU (the shipped pair, float32): three servers,
# one after another, each its own process, nothing else running. NAME.json / NAME.log here.
# Run from the repository root.
set -u
dir=$(cd "$(dirname "$0")" && pwd)
serve() {  # $1 name, $2 the requests' method, then cospec serve flags
    local name=$1 method=$2; shift 2
    OMP_NUM_THREADS=2 python3 -m cospec serve --target qwen2.5-coder-1.5b \
        --draft qwen2.5-coder-0.5b --port 8031 "$@" > "/tmp/$name.server.log" 2>&1 &
    local pid=$!
    until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8031/health')" \
        2>/dev/null; do sleep 2; done
    { echo "load before $(cut -d' ' -f1-3 /proc/loadavg)"
      python3 scripts/lone_client.py --url http://127.0.0.1:8031 --method "$method" \
          --prompts 3 --tokens 96 --out "$dir/$name.json"
    } > "$dir/$name.log"
    kill $pid; wait $pid 2>/dev/null
}
serve batch-spd spd --methods target,spd                           # the batch engine's one row
serve rr-staged spd-staged --methods target,spd,spd-staged --max-batch 0  # the batch-1 host loop
serve batch-target target --methods target,spd
python3 scripts/lone_summary.py "$dir" batch-target batch-spd rr-staged  # summary.json
