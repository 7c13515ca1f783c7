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
python3 - "$dir" <<'PY'  # summary.json: totals and per-prompt paired ratios (wall tok/s)
import json, statistics as st, sys
D = sys.argv[1]
d = {n: json.load(open(f"{D}/{n}.json")) for n in ("batch-target", "batch-spd", "rr-staged")}
out = {"runs": {}, "paired": {}}
for n, rows in d.items():
    tot, w = sum(r["tokens"] for r in rows), sum(r["wall_s"] for r in rows)
    dec = sum(r["decode_s"] for r in rows)
    out["runs"][n] = {"tokens": tot, "wall_s": round(w, 2), "tokens_per_s": round(tot / w, 3),
                      "decode_tokens_per_s": round(tot / dec, 3),
                      "mean_tau": round(st.mean(r["tau"] for r in rows), 3),
                      "started_alone": sum(r["started_alone"] for r in rows)}
for a, b in (("batch-target", "batch-spd"), ("batch-target", "rr-staged"),
             ("batch-spd", "rr-staged")):
    r = [(y["tokens"] / y["wall_s"]) / (x["tokens"] / x["wall_s"]) for x, y in zip(d[a], d[b])]
    out["paired"][f"{b} / {a}"] = {
        "total": round(out["runs"][b]["tokens_per_s"] / out["runs"][a]["tokens_per_s"], 3),
        "median": round(st.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}
out["same_text"] = sum(a["text"] == b["text"] == c["text"] for a, b, c in zip(*d.values()))
json.dump(out, open(f"{D}/summary.json", "w"), indent=1)
PY
