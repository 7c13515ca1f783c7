#!/usr/bin/env bash
# One poll of a gpu_queue.sh run, for a device call: waits SECONDS (default 25), prints the
# queue log's last lines, and packs everything under $R but the queues' repository copies
# into $OUT/r.tgz (when OUT is set), so the results so far come back with every poll, not
# only if a last call reaches the machine before it is given back:
#
#   R=/tmp/r bash scripts/gpu_poll.sh [SECONDS] [LINES]
set -eu
R=${R:-/tmp/r6}
sleep "${1:-25}"
tail -n "${2:-3}" "$R/queue.log" 2>/dev/null || echo "gpu_poll.sh: no $R/queue.log yet"
if [ -n "${OUT:-}" ] && [ -d "$R" ]; then
    tar czf "$OUT/r.tgz" -C "$R" --exclude='./repo-*' .
fi
