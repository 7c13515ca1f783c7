#!/usr/bin/env bash
# gpu_stages.sh stages one after another in the background, each in its own process, so that
# the calls holding a GPU machine stay short (start the queue, then read its log) and one
# failing stage does not stop the ones after it. Returns at once:
#
#   R=/tmp/r COSPEC_CACHE=/tmp/cc PYTHONPATH=/tmp/site:. bash scripts/gpu_queue.sh \
#       [--after FILE | --alongside] STEP [STEP ...]
#
# STEP is a stage of gpu_stages.sh, or "VAR=value [VAR=value ...],stage" to set variables for
# that stage only (e.g. VSERVE_METHOD=spd,vserve or "VBATCH_METHODS=spd VBATCHES=1,4,vbatch":
# the stage follows the last comma; values hold no spaces). The repository is copied to
# $R/repo-N first, so later edits of the working tree do not reach a running queue, and
# $R/repo-N.done marks the queue's end (its name is printed). --after FILE: start once FILE exists (e.g. another queue's done
# file: queues run one after the other). Progress: $R/queue.log (shared by the queues), a line
# per finished step with its exit status and the machine's load. (scripts/gpu_poll.sh reads it
# and brings the results so far back in $OUT.) A queue's PID is in
# $R/repo-N.pid (stop it: kill -- -PID, its whole process group). A queue still running
# (or still waiting for its --after file) refuses a new one without --after (two would time
# each other): --after its done file, or --alongside to run both at once on purpose.
set -eu
export R=${R:-/tmp/r6}
after= alongside=
while :; do
    case ${1:-} in
        --after) after=$2; shift 2 ;;
        --alongside) alongside=1; shift ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || {
    echo "usage: gpu_queue.sh [--after FILE | --alongside] STEP [STEP ...]" >&2; exit 2; }
mkdir -p "$R"
if [ -z "$after$alongside" ]; then
    for pid in "$R"/repo-*.pid; do
        [ -e "$pid" ] && [ ! -e "${pid%.pid}.done" ] || continue
        stat=/proc/$(cat "$pid")/stat  # alive: there and not a zombie (state, field 3)
        [ -r "$stat" ] && [ "$(cut -d' ' -f3 "$stat")" != Z ] || continue
        echo "gpu_queue.sh: ${pid%.pid} is still running: --after ${pid%.pid}.done (or" \
             "--alongside)" >&2
        exit 2
    done
fi
repo=$(mktemp -d "$R/repo-XXXX")
tar --exclude='./.dev-*' --exclude='./.git' -cf - . | tar xf - -C "$repo"
setsid nohup bash -c '
    after=$1 repo=$2; shift 2
    unset OUT  # gpu_stages.sh copies $R to $OUT when set: the calling command'"'"'s, gone by then
    while [ -n "$after" ] && [ ! -e "$after" ]; do sleep 2; done
    cd "$repo"
    for step in "$@"; do
        case $step in
            *,*) env ${step%,*} bash scripts/gpu_stages.sh "${step##*,}" ;;  # word-split: VARs
            *) bash scripts/gpu_stages.sh "$step" ;;
        esac >> "$R/queue.log" 2>&1 < /dev/null
        rc=$?  # before any other expansion resets it
        echo "--- $(date +%T) $step exit $rc load $(cut -d" " -f1-3 /proc/loadavg)" >> "$R/queue.log"
    done
    touch "$repo.done"' queue "$after" "$repo" "$@" > /dev/null 2>&1 < /dev/null &
echo $! > "$repo.pid"
echo "queued ${*} (log: $R/queue.log; done: $repo.done; pid: $(cat "$repo.pid"))"
