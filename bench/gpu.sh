#!/usr/bin/env bash
# The GPU tests and benchmark matrix, for one H100/H200, within a time budget:
#
#   bash bench/gpu.sh            # results in $OUT (default ./bench-out): bench.json, bench.md, runs/,
#                                # gpu-tests.txt (tests/test_gpu.py), versions.txt, nvidia-smi.txt,
#                                # runs/importtime.txt (where a bench process's imports spend their time)
#
# Every run has its own time limit and the least time it needs (from the H200's durations in
# docs/benchmarks.md), and a failed run (out of memory, say) costs that run only. A compiled run is a
# process of its own; eager runs share one process per group, so the imports and the CUDA start-up
# are paid once. A run that needs more than is left of the overall budget (BENCH_BUDGET_S, default
# 450 s, counted from the script's start) is not started ("not run: needs N s, M s left"); a run that
# is started gets at least what it needs. Not-run and failed runs still appear in the table with the
# reason. While the GPU tests run, the first compiled runs compile ahead in processes of their own
# (BENCH_WARM, below), and no run is timed until those have ended. Without BENCH_ONLY everything
# runs, the tests first, then the runs in order of importance (plan() below).
# BENCH_ONLY="tests NAME ... GROUP ..." runs only those, in that order (a group name, or any run in
# it, places the group there; its runs named in BENCH_ONLY share one process, or all of them if the
# group itself is named); a name that matches nothing is warned about at the start. BENCH_LIST=1
# prints every run's name and arguments and stops.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-out}
BUDGET_S=${BENCH_BUDGET_S:-450}
RUNS=$OUT/runs
mkdir -p "$RUNS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
start=$SECONDS
# Appended to every run; e.g. BENCH_EXTRA="--tiny --res 64 --threads 1" BENCH_SKIP_INSTALL=1 is a
# CPU smoke test of this script.
read -r -a EXTRA <<<"${BENCH_EXTRA:-}"
# Names on several lines (as docs/benchmarks.md writes a long BENCH_ONLY) count as if on one.
read -r -d '' -a ONLY <<<"${BENCH_ONLY:-}" || true
BENCH_ONLY=${ONLY[*]-}

PY=${PYTHON:-python3}

SD15=(--arch sd15 --res 512)
# --kernels: each run also sums its kernels' time by kind (attention, convolution, matmul, fused...)
# next to each kind's FLOPs, a few seconds that say which kind holds MFU down.
STEPS=(--steps 10 --warmup 3 --kernels)
# Compiled runs need more warm-up: the first steps compile forward, backward and recompile once.
CSTEPS=(--steps 10 --warmup 5 --kernels)
# CUDA-graph runs without --kernels: their kernels replay inside graphs, a part of CUPTI's tracing
# that has crashed processes before; a crash would lose the run's numbers.
GSTEPS=(--steps 10 --warmup 5)

# run NAME LIMIT_S NEED_S ARGS...: LIMIT_S is the run's time limit, NEED_S the least time it needs.
# Measured on an H200 (docs/benchmarks.md): an eager run took 23-37 s in a process of its own (about
# 2 s of it steps; in a group the first run pays the start-up), the compiled SD1.5 bs1 run with CUDA
# graphs 140 s, compiled SD1.5 bs16 about 100 s, compiled SD3.5 Medium about 70 s; the compiled
# channels_last run was still compiling after 120 s. On the H100 a compiled SD1.5 run alone needs
# more (hence 240 s): four compiling together took 178-197 s, and one alone had not finished after
# 200 s (start-up, FLOP count, compile and warm-up, steps: about 230 s). Eager runs share a process
# per group; compiled ones keep their own, since a compile can hang or exhaust memory. The order is
# by importance: the four targets eager (each then has a number even if time runs out) and the
# diffusers example's way for the speedup column, the compiled runs that meet the targets, the rest
# of the SD1.5 matrix one change at a time, the training loop's own step, then what might lift
# SD1.5 bs16 to 35% MFU.
plan() {
    group_begin targets
    run sd15-bs16-bf16 90 30 "${SD15[@]}" --bs 16 --precision bf16 "${STEPS[@]}"
    run sd15-bs1-bf16 60 30 "${SD15[@]}" --bs 1 --precision bf16 "${STEPS[@]}"
    run sd35m-bs3-bf16 90 40 --arch sd35m --res 1024 --bs 3 --precision bf16 "${STEPS[@]}"
    run sd35l-bs1-nf4-ckpt 120 60 --arch sd35l --res 1024 --bs 1 --precision bf16 --nf4 --checkpointing \
        --steps 5 --warmup 2
    run sd15-bs16-baseline 90 30 "${SD15[@]}" --bs 16 --baseline "${STEPS[@]}"
    run sd15-bs1-baseline 60 30 "${SD15[@]}" --bs 1 --baseline "${STEPS[@]}"
    group_end
    run sd15-bs1-bf16-compile-cudagraphs 300 240 "${SD15[@]}" --bs 1 --precision bf16 --compile \
        --compile-mode reduce-overhead "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile "${CSTEPS[@]}"
    run sd35m-bs3-bf16-compile 180 80 --arch sd35m --res 1024 --bs 3 --precision bf16 --compile "${CSTEPS[@]}"
    # The rest of the SD1.5 matrix, one change at a time from sd15-bs16-bf16, and the loop's eager step.
    group_begin matrix
    run sd15-bs16-bf16-ckpt 60 30 "${SD15[@]}" --bs 16 --precision bf16 --checkpointing "${STEPS[@]}"
    run sd15-bs16-bf16-adamw8bit 60 30 "${SD15[@]}" --bs 16 --precision bf16 --optimizer adamw8bit "${STEPS[@]}"
    run sd15-bs16-bf16-rank64 60 30 "${SD15[@]}" --bs 16 --precision bf16 --rank 64 "${STEPS[@]}"
    run sd15-bs16-bf16-no-cudnn-benchmark 60 30 "${SD15[@]}" --bs 16 --precision bf16 --no-cudnn-benchmark \
        "${STEPS[@]}"
    run sd15-bs16-fp32 90 40 "${SD15[@]}" --bs 16 --precision fp32 "${STEPS[@]}"
    run sd15-bs1-fp32 60 30 "${SD15[@]}" --bs 1 --precision fp32 "${STEPS[@]}"
    run sd15-bs16-bf16-loop-no-autocast 90 30 "${SD15[@]}" --bs 16 --precision bf16 --loop --no-autocast \
        "${STEPS[@]}"
    # Every run but the -peft-lora ones adds its LoRA products inside GEMMs (sdtune.train.lora.AddmmLora);
    # this one keeps peft's own forward, as all runs before 2026-11-27 did.
    run sd15-bs16-bf16-peft-lora 60 30 "${SD15[@]}" --bs 16 --precision bf16 --lora-forward peft "${STEPS[@]}"
    # Without autocast (train.autocast: false, the loop's default; the bench's runs keep autocast
    # unless --no-autocast): CUDA autocast runs every norm and upsampling in float32, between casts.
    # On the H100 the eager step without it took 157.0 ms pipelined against 169.9 ms, and peaked
    # 4.27 GiB lower (docs/benchmarks.md; the compiled run is below).
    run sd15-bs16-bf16-no-autocast 60 30 "${SD15[@]}" --bs 16 --precision bf16 --no-autocast "${STEPS[@]}"
    run sd35l-bs1-nf4 120 60 --arch sd35l --res 1024 --bs 1 --precision bf16 --nf4 --steps 5 --warmup 2
    group_end
    # Which attention kernel and which convolution layout are fastest, kernel by kind (--kernels):
    # compiled code calls the same SDPA and cuDNN kernels, so the eager steps answer for it too.
    # Most of SD1.5's attention has 40-dim heads, which kernels tiled for 64 or 128 run poorly.
    group_begin kernels
    run sd15-bs16-bf16-flash-attn 60 30 "${SD15[@]}" --bs 16 --precision bf16 --attention flash "${STEPS[@]}"
    run sd15-bs16-bf16-efficient-attn 60 30 "${SD15[@]}" --bs 16 --precision bf16 --attention efficient "${STEPS[@]}"
    run sd15-bs16-bf16-cudnn-attn 60 30 "${SD15[@]}" --bs 16 --precision bf16 --attention cudnn "${STEPS[@]}"
    run sd15-bs16-bf16-math-attn 60 30 "${SD15[@]}" --bs 16 --precision bf16 --attention math "${STEPS[@]}"
    run sd15-bs16-bf16-channels-last 60 30 "${SD15[@]}" --bs 16 --precision bf16 --channels-last "${STEPS[@]}"
    group_end
    # The training loop's own step (--loop: host-side batch, per-step generator, accelerate,
    # clipping, LR schedule; no autocast, as train.autocast's default trains: the runs named -loop,
    # before 2026-11-28, kept autocast) compiled, against the plain compiled steps above; bs1 and
    # SD3.5 Medium ran on the H100, bs16 not yet (its CUDA-graph run, alone and not compiled ahead,
    # had not finished after 200 s).
    run sd15-bs16-bf16-compile-loop-no-autocast 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --loop --no-autocast "${CSTEPS[@]}"
    run sd15-bs16-bf16-compile-cudagraphs-loop-no-autocast 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --loop --no-autocast "${GSTEPS[@]}"
    run sd15-bs1-bf16-compile-cudagraphs-loop-no-autocast 300 240 "${SD15[@]}" --bs 1 --precision bf16 --compile \
        --compile-mode reduce-overhead --loop --no-autocast "${GSTEPS[@]}"
    # inductor's C++ wrapper launches the compiled kernels from C++, not Python: on a CPU it made the
    # tiny step 15-30% faster. At bs1 it might give most of what CUDA graphs give without their
    # limits (no grad_accum); its compile time is a guess.
    run sd15-bs1-bf16-compile-cpp-wrapper-loop-no-autocast 400 300 "${SD15[@]}" --bs 1 --precision bf16 --compile \
        --inductor cpp_wrapper=True --loop --no-autocast "${CSTEPS[@]}"
    run sd35m-bs3-bf16-compile-loop-no-autocast 180 80 --arch sd35m --res 1024 --bs 3 --precision bf16 --compile \
        --loop --no-autocast "${CSTEPS[@]}"
    # Candidates for the SD1.5 bs16 MFU target (35% asked). On the H100 (docs/benchmarks.md, both
    # calls) the compiled step takes 117-125 ms (22-24%): attention (cuDNN's, 40-dim heads) 25.5 ms at
    # 237 TFLOP/s, matmuls 22 ms at 345, convolutions 19 ms at 745, inductor's fused kernels 26 ms,
    # cuDNN's NCHW<->NHWC conversions 10 ms, and 11 ms in which no kernel runs. CUDA graphs took the
    # idle time (112.5 ms); forcing inductor's layout optimisation removed the conversions but made
    # the fused norm kernels 7.8 ms slower (122.2 ms; with CUDA graphs 110.4). Next: coordinate-
    # descent tuning of the fused kernels under CUDA graphs (its compile time is a guess), and
    # max-autotune. channels_last, cuDNN attention named, and both, ran at 117-118 ms.
    run sd15-bs16-bf16-compile-cudagraphs 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead "${GSTEPS[@]}"
    # Channels-last with group norms that take their statistics channel by channel (sdtune/train/norms.py):
    # inductor's own group norm reads NHWC memory in 20-byte strided pieces, which most likely made the
    # forced layout's norm kernels 7.8 ms slower; per channel it reads whole rows. If the norms keep
    # their NCHW speed, the step keeps the forced layout's gain (no cuDNN conversions: 10.3 ms of
    # kernels) without its loss. The run with torch's group norm is the comparison; the last, not
    # under CUDA graphs, traces its kernels by kind. On the H100 (2026-11-28): 105.5 ms synced, 100.5
    # pipelined (26.4% MFU), the fastest SD1.5 bs16 step yet, against 112.5 / 107.0 for the plain
    # CUDA-graph step; the forced layout per channel 108.8 / 103.2; traced, the memory-bound kernels
    # took 30.0 ms a step where the plain compiled step's took 37.7 (conversions included).
    run sd15-bs16-bf16-compile-channels-last-per-channel-gn-cudagraphs 300 240 "${SD15[@]}" --bs 16 \
        --precision bf16 --compile --compile-mode reduce-overhead --channels-last --group-norm per-channel \
        "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-channels-last-cudagraphs 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --channels-last "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-force-layout-per-channel-gn-cudagraphs 300 240 "${SD15[@]}" --bs 16 \
        --precision bf16 --compile --compile-mode reduce-overhead --inductor force_layout_optimization=True \
        --group-norm per-channel "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-channels-last-per-channel-gn 300 240 "${SD15[@]}" --bs 16 --precision bf16 \
        --compile --channels-last --group-norm per-channel "${CSTEPS[@]}"
    # Inductor skips its layout optimisation for SD1.5 (3x3 convolutions from 2560 channels to 1280),
    # and for every backward graph (no convolution in it): the channels-last step above runs on
    # eager's layouts, and cuDNN copies the 17 of 94 convolution gradients that are not dense in
    # channels-last (python -m bench.layouts). Forced on channels-last weights, inductor lays the
    # gradients out itself, with no weight conversions each step as the forced layout's NCHW
    # weights need. The second is traced.
    run sd15-bs16-bf16-compile-channels-last-force-layout-per-channel-gn-cudagraphs 300 240 "${SD15[@]}" \
        --bs 16 --precision bf16 --compile --compile-mode reduce-overhead --channels-last \
        --inductor force_layout_optimization=True --group-norm per-channel "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-channels-last-force-layout-per-channel-gn 300 240 "${SD15[@]}" --bs 16 \
        --precision bf16 --compile --channels-last --inductor force_layout_optimization=True \
        --group-norm per-channel "${CSTEPS[@]}"
    # 8 of those 17 gradients are NCHW because inductor's backward of F.interpolate is an atomic
    # scatter into an NCHW float32 buffer; upsampling by a broadcast (sdtune/train/upsample.py) makes
    # it a 2x2 sum in the gradient's own layout (python -m bench.layouts --upsample broadcast: 9 copied).
    run sd15-bs16-bf16-compile-channels-last-per-channel-gn-broadcast-upsample-cudagraphs 300 240 "${SD15[@]}" \
        --bs 16 --precision bf16 --compile --compile-mode reduce-overhead --channels-last --group-norm per-channel \
        --upsample broadcast "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-channels-last-per-channel-gn-broadcast-upsample 300 240 "${SD15[@]}" --bs 16 \
        --precision bf16 --compile --channels-last --group-norm per-channel --upsample broadcast "${CSTEPS[@]}"
    # The fastest step so far (on the H200, 2026-11-28: 98.8 ms synced, 94.9 back to back), tuned,
    # and as the training loop runs it (no autocast, as it trains; there 97.5 ms back to back
    # without the broadcast).
    run sd15-bs16-bf16-compile-channels-last-per-channel-gn-broadcast-upsample-cudagraphs-tuned 400 300 \
        "${SD15[@]}" --bs 16 --precision bf16 --compile --compile-mode reduce-overhead --channels-last \
        --group-norm per-channel --upsample broadcast --inductor coordinate_descent_tuning=True "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-cudagraphs-loop-no-autocast-channels-last-per-channel-gn-broadcast-upsample 300 240 \
        "${SD15[@]}" --bs 16 --precision bf16 --compile --compile-mode reduce-overhead --channels-last \
        --group-norm per-channel --upsample broadcast --loop --no-autocast "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-cudagraphs-loop-no-autocast-channels-last-per-channel-gn 300 240 "${SD15[@]}" \
        --bs 16 --precision bf16 --compile --compile-mode reduce-overhead --channels-last --group-norm per-channel \
        --loop --no-autocast "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-cudagraphs-tuned 400 300 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --inductor coordinate_descent_tuning=True "${GSTEPS[@]}"
    # Tuning may also win back what the forced layout cost the norm kernels (7.8 ms).
    run sd15-bs16-bf16-compile-force-layout-cudagraphs-tuned 400 300 "${SD15[@]}" --bs 16 --precision bf16 \
        --compile --compile-mode reduce-overhead --inductor force_layout_optimization=True \
        --inductor coordinate_descent_tuning=True "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-force-layout 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --inductor force_layout_optimization=True "${CSTEPS[@]}"
    run sd15-bs16-bf16-compile-force-layout-cudagraphs 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --inductor force_layout_optimization=True "${GSTEPS[@]}"
    run sd15-bs16-bf16-compile-no-cudnn-benchmark 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --no-cudnn-benchmark "${CSTEPS[@]}"
    run sd15-bs16-bf16-compile-cudnn-attn 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --attention cudnn "${CSTEPS[@]}"
    run sd15-bs16-bf16-compile-channels-last 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --channels-last "${CSTEPS[@]}"
    run sd15-bs16-bf16-compile-cudnn-attn-channels-last 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --attention cudnn --channels-last "${CSTEPS[@]}"
    run sd15-bs16-bf16-compile-max-autotune 420 300 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode max-autotune-no-cudagraphs "${CSTEPS[@]}"
    # FlashAttention 4 in the flash kernel's place (bench/wheels-fa4, installed by a call of its own:
    # see install below). The roofline says cuDNN's attention backward runs at 1.34x the floor of a
    # kernel that takes its exponentials after its matmuls; FA4 overlaps them. Its kernels compile on
    # first use (a guess: a minute or two).
    run sd15-bs16-bf16-fa4-attn 300 120 "${SD15[@]}" --bs 16 --precision bf16 --attention fa4 "${STEPS[@]}"
    run sd15-bs16-bf16-compile-cudagraphs-fa4 400 300 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --attention fa4 "${GSTEPS[@]}"
    # The best compiled step so far with peft's LoRA forward, against sd15-bs16-bf16-compile-cudagraphs.
    # Compiled, AddmmLora's sums are plain adds (inductor would copy an addmm's C first), so what is
    # left is its rank-wide backward scale: the roofline's fused floor 57.9 -> 56.6 ms. (Eagerly it
    # took 10 ms of kernels off the H100's step, docs/benchmarks.md.)
    run sd15-bs16-bf16-compile-cudagraphs-peft-lora 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --lora-forward peft "${GSTEPS[@]}"
    # Compiled, the casts fuse into the norms, and traced as inductor splits the step the forward keeps
    # the same 10.4 GiB either way (bench.roofline --compiled). On the H100 it read as the run with
    # autocast: 106.9 against 106.8 ms pipelined, 11.79 GiB both.
    run sd15-bs16-bf16-compile-cudagraphs-no-autocast 300 240 "${SD15[@]}" --bs 16 --precision bf16 --compile \
        --compile-mode reduce-overhead --no-autocast "${GSTEPS[@]}"
}

# plan() is walked once to list the runs and groups (MODE=list), then once per unit to run (MODE=run):
# a unit is the tests, a run of its own, or a group. UNIT is the unit being run.
MODE=list CUR_GROUP="" UNIT="" GROUP_FILE=""
declare -A RUN_ARGS=() RUN_LIMITS=()
WARM=()  # the compiled runs the warm pool compiles ahead (see warm_all)
ALL_RUNS=() RUN_GROUPS=() ALL_GROUPS=() PLAN_UNITS=() GROUP_NAMES=() GROUP_NEEDS=() GROUP_LIMIT=0
results=()

stub() {  # NAME MESSAGE: a result file that says why there are no numbers
    printf '{"name": "%s", "error": "%s"}\n' "$1" "$2" >"$RUNS/$1.json"
}

selected() {  # NAME GROUP: whether BENCH_ONLY asks for this run
    [[ -z ${BENCH_ONLY:-} || " $BENCH_ONLY " == *" $1 "* || ( -n $2 && " $BENCH_ONLY " == *" $2 "* ) ]]
}

# run NAME LIMIT_S NEED_S ARGS...: one bench.train_step process, or between group_begin and
# group_end a line of the group's file
run() {
    local name=$1 limit=$2 need=$3 left rc began
    shift 3
    if [[ $MODE == list ]]; then
        ALL_RUNS+=("$name")
        RUN_GROUPS+=("$CUR_GROUP")
        RUN_ARGS[$name]=$(printf '%q ' "$@")
        RUN_LIMITS[$name]=$limit
        if [[ -z $CUR_GROUP ]]; then
            PLAN_UNITS+=("run:$name")
        fi
        return 0
    fi
    if [[ -n $CUR_GROUP ]]; then
        if [[ $UNIT != "group:$CUR_GROUP" ]]; then
            return 0
        fi
    elif [[ $UNIT != "run:$name" ]]; then
        return 0
    fi
    if ! selected "$name" "$CUR_GROUP"; then
        return 0
    fi
    results+=("$RUNS/$name.json")
    rm -f "$RUNS/$name.json"
    if [[ -n $CUR_GROUP ]]; then
        printf '%q ' "$limit" "$need" --name "$name" --json "$RUNS/$name.json" "$@" "${EXTRA[@]}" >>"$GROUP_FILE"
        echo >>"$GROUP_FILE"
        GROUP_NAMES+=("$name")
        GROUP_NEEDS+=("$need")
        GROUP_LIMIT=$((GROUP_LIMIT + limit))
        return 0
    fi
    wait_for_warm
    if contains "$name" "${WARM[@]}"; then
        warmed "$name"
    elif compiled_earlier "$name"; then
        echo "== $name: compiled ahead in an earlier call on this machine"
        need=$((WARM_NEED_S < need ? WARM_NEED_S : need))
    fi
    left=$((BUDGET_S - (SECONDS - start)))
    if ((left < need)); then
        echo "== $name: not run: needs ${need}s, ${left}s left"
        stub "$name" "not run: needs ${need} s, ${left} s left"
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo "== $name (timeout ${limit}s, needs ${need}s, ${left}s left)"
    rc=0
    began=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" -m bench.train_step --name "$name" --json "$RUNS/$name.json" "$@" "${EXTRA[@]}" \
        >"$RUNS/$name.log" 2>&1 || rc=$?
    echo "   $((SECONDS - began))s wall"
    if ((rc == 0)); then
        tail -n 1 "$RUNS/$name.log"
        if [[ " $* " == *" --compile "* ]]; then  # compiled by its own run, as a warm process would
            remember_compiled "$name"
        fi
    elif ((rc == 124 || rc == 137)); then
        echo "   timed out after ${limit}s (log: runs/$name.log)"
        stub "$name" "timed out after ${limit}s"
    else
        tail -n 3 "$RUNS/$name.log"
        stub "$name" "failed (exit $rc), see runs/$name.log"
    fi
}

# group_begin ... group_end: the runs in between share one process (bench.train_step --many), so
# the imports and the CUDA start-up, most of an eager run's wall time, are paid once. Each run keeps
# its own time limit and need inside it; one that fails is reported and the next runs. A hang ends
# the group, and the runs it did not reach say so.
group_begin() {
    CUR_GROUP=$1
    if [[ $MODE == list ]]; then
        ALL_GROUPS+=("$1")
        PLAN_UNITS+=("group:$1")
        return 0
    fi
    GROUP_FILE=$RUNS/group-$1.txt
    GROUP_NAMES=()
    GROUP_NEEDS=()
    GROUP_LIMIT=0
    if [[ $UNIT == "group:$1" ]]; then
        : >"$GROUP_FILE"
    fi
}
group_end() {
    local group=$CUR_GROUP file=$GROUP_FILE left limit need rc=0 began i
    CUR_GROUP=""
    if [[ $MODE == list || $UNIT != "group:$group" ]] || ((${#GROUP_NAMES[@]} == 0)); then
        return 0
    fi
    need=${GROUP_NEEDS[0]}
    for i in "${GROUP_NEEDS[@]}"; do
        need=$((i < need ? i : need))
    done
    wait_for_warm
    left=$((BUDGET_S - (SECONDS - start)))
    if ((left < need)); then
        echo "== ${GROUP_NAMES[*]}: not run: the least any needs is ${need}s, ${left}s left"
        for i in "${!GROUP_NAMES[@]}"; do
            stub "${GROUP_NAMES[i]}" "not run: needs ${GROUP_NEEDS[i]} s, ${left} s left"
        done
        return 0
    fi
    limit=$((GROUP_LIMIT < left ? GROUP_LIMIT : left))
    echo "== ${GROUP_NAMES[*]} (one process, timeout ${limit}s, ${left}s left)"
    began=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" -m bench.train_step --many "$file" --budget-s "$left" \
        >"${file%.txt}.log" 2>&1 || rc=$?
    grep -E "^($(IFS='|'; echo "${GROUP_NAMES[*]}")): " "${file%.txt}.log" | sed 's/^/   /' || true
    echo "   $((SECONDS - began))s wall"
    for i in "${GROUP_NAMES[@]}"; do
        if [[ ! -f $RUNS/$i.json ]]; then
            stub "$i" "no result: its group's process ended (exit $rc) before writing one, see runs/$(basename "${file%.txt}").log"
        fi
    done
}

contains() {  # WORD LIST...: whether WORD is one of LIST
    local word=$1 item
    shift
    for item in "$@"; do
        if [[ $item == "$word" ]]; then
            return 0
        fi
    done
    return 1
}

# The units to run, in order: everything (the tests first), or what BENCH_ONLY names, in its order.
plan
# BENCH_LIST=1: print each run's name and arguments, one a line, and stop (tests/test_bench.py
# checks every line against bench.train_step's parser).
if [[ -n ${BENCH_LIST:-} ]]; then
    for name in "${ALL_RUNS[@]}"; do
        echo "$name ${RUN_ARGS[$name]}"
    done
    exit 0
fi
UNITS=() UNKNOWN=() ORDER=()
if ((${#ONLY[@]} == 0)); then
    UNITS=(tests "${PLAN_UNITS[@]}")
else
    for word in "${ONLY[@]}"; do
        unit=""
        if [[ $word == tests ]]; then
            unit=tests
        elif contains "$word" "${ALL_GROUPS[@]}"; then
            unit=group:$word
        else
            for i in "${!ALL_RUNS[@]}"; do
                if [[ ${ALL_RUNS[i]} == "$word" ]]; then
                    unit=${RUN_GROUPS[i]:+group:${RUN_GROUPS[i]}}
                    unit=${unit:-run:$word}
                fi
            done
        fi
        if [[ -z $unit ]]; then
            UNKNOWN+=("$word")
        elif ((${#UNITS[@]} == 0)) || ! contains "$unit" "${UNITS[@]}"; then
            UNITS+=("$unit")
        fi
    done
fi
for unit in "${UNITS[@]}"; do
    if [[ $unit == group:* ]]; then
        members=()
        for i in "${!ALL_RUNS[@]}"; do
            if [[ ${RUN_GROUPS[i]} == "${unit#group:}" ]] && selected "${ALL_RUNS[i]}" "${RUN_GROUPS[i]}"; then
                members+=("${ALL_RUNS[i]}")
            fi
        done
        ORDER+=("${unit#group:}(${members[*]})")
    else
        ORDER+=("${unit#run:}")
    fi
done
WARNING=""
if ((${#UNKNOWN[@]})); then
    WARNING="WARNING: BENCH_ONLY names no run or group: ${UNKNOWN[*]} (groups: ${ALL_GROUPS[*]}; runs: plan() in bench/gpu.sh)"
    echo "$WARNING"
fi
echo "order: ${ORDER[*]:-nothing}; budget ${BUDGET_S}s"

# Wheels for what the box lacks (diffusers, bitsandbytes, torchao, pydantic, ruamel.yaml): installed
# into a folder of their own, without deps or an index (the box has no network), and put first on
# the path so they win over any other version there. sdtune itself runs from the checkout.
# bench/wheels-fa4 (bench/fa4-wheels.sh) is FlashAttention 4 for --attention fa4: too big to travel
# with the others, it comes in a call of its own, BENCH_INSTALL_ONLY=1, which installs into the same
# folder and stops; the next call on the same warm machine finds it there. Its largest wheel comes
# as its contents, xz-packed (.tar.xz): unpacked into the folder as pip would.
SITE=${BENCH_SITE:-/tmp/sdtune-site} FA4_WHEELS=${BENCH_FA4_WHEELS:-bench/wheels-fa4}
# install DIR...: each folder's wheels, and its .tar.xz unpacked, into $SITE, which goes first on the path.
install() {
    local dir wheels=() trees=()
    shopt -s nullglob
    for dir; do
        wheels+=("$dir"/*.whl)
        trees+=("$dir"/*.tar.xz)
    done
    shopt -u nullglob
    if ((${#wheels[@]})); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"
    fi
    for dir in "${trees[@]}"; do
        mkdir -p "$SITE" && tar -xJf "$dir" -C "$SITE"
    done
    # pip's --target folder is not a site folder: the .pth files there are not read. The CuTe DSL's
    # (FlashAttention 4's compiler) puts its dsl_packages folder on the path; so does this.
    local path=$SITE
    [[ -d $SITE/nvidia_cutlass_dsl/dsl_packages ]] && path+=:$SITE/nvidia_cutlass_dsl/dsl_packages
    if [[ -d $SITE ]]; then
        export PYTHONPATH=$path:$PWD
    else
        export PYTHONPATH=$PWD
    fi
}
if [[ -n ${BENCH_INSTALL_ONLY:-} ]]; then
    install "$FA4_WHEELS"
    "$PY" -c "import flash_attn.cute.interface; print('FlashAttention 4: importable')" 2>&1 | tail -1 | tee "$OUT/fa4.txt"
    exit 0
fi
[[ -n ${BENCH_SKIP_INSTALL:-} ]] || install bench/wheels "$FA4_WHEELS"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
# The versions, the bf16 matmul ceiling this card reaches (the datasheet peak is the MFU
# denominator; this is what real GEMMs get) and its copy bandwidth: one process, so CUDA starts once.
if ! "$PY" - >"$OUT/versions.txt" 2>&1 <<'EOF'
import torch, diffusers, peft, bitsandbytes
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, torch.cuda.get_device_name() if cuda else "no GPU")
try:
    from importlib.metadata import version
    print("pytest-timeout", version("pytest-timeout"))
except Exception:
    print("pytest-timeout missing: the GPU tests run without a per-test time limit")
try:
    from sdtune.profiling import hardware
    print("bf16 matmul ceiling (%s^3, best of 5): %.0f TFLOP/s" % (
        8192 if cuda else 1024, hardware.measured_matmul_tflops("cuda" if cuda else "cpu", torch.bfloat16)))
    # What memory-bound kernels can reach: bench.roofline's --bandwidth-gbs for this card.
    print("copy bandwidth (256 MiB, best of 5): %.0f GB/s" % hardware.measured_bandwidth_gbs("cuda" if cuda else "cpu"))
except Exception as err:  # the ceilings are informative; the runs need only the imports above
    print("bf16 matmul ceiling or copy bandwidth: failed:", type(err).__name__, err)
EOF
then
    cat "$OUT/versions.txt"
    echo "missing packages; put the wheels the box lacks in bench/wheels/ (see docs/benchmarks.md)"
    exit 1
fi
cat "$OUT/versions.txt"

# The CUDA-only tests (QLoRA, fused AdamW, CUDA graphs, bitsandbytes/float8 variants, trace and
# snapshot): they say whether the code paths the benchmark times work at all. -v writes each test's
# verdict as it ends, so a hang that the overall limit kills still leaves the verdicts before it; a
# test past its own limit (pytest-timeout, SIGALRM) fails and the next one runs.
# BENCH_TESTS_TIMEOUT_S (default 240) limits them all: next to three compiling processes on the
# H100 it ran out in the 14th of 16 tests (2026-11-28).
run_tests() {
    if [[ -n ${BENCH_SKIP_TESTS:-} ]]; then
        echo "== tests/test_gpu.py: skipped (BENCH_SKIP_TESTS)"
        return 0
    fi
    local began per_test=() limit=${BENCH_TESTS_TIMEOUT_S:-240} left=$((BUDGET_S - (SECONDS - start)))
    if ((left < 30)); then  # named after runs in BENCH_ONLY: the budget binds the tests too
        echo "== tests/test_gpu.py: not run: ${left}s of the budget left"
        return 0
    fi
    limit=$((limit < left ? limit : left))
    if grep -q '^pytest-timeout [0-9]' "$OUT/versions.txt"; then
        per_test=(--timeout="${BENCH_TEST_TIMEOUT_S:-120}")
    fi
    echo "== tests/test_gpu.py (timeout ${limit}s, ${per_test[0]:-no per-test limit})"
    began=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" -m pytest -v -rs -p no:cacheprovider \
        "${per_test[@]}" tests/test_gpu.py >"$OUT/gpu-tests.txt" 2>&1 || true
    grep -E '::|^SKIPPED' "$OUT/gpu-tests.txt" | sed 's/^/   /' || true
    tail -n 1 "$OUT/gpu-tests.txt"
    echo "   $((SECONDS - began))s wall"
}

# Where a bench process's start-up goes: on the H100 its imports took 17-25 s (5 s on a laptop's
# CPU), nearly all in torch, Dynamo and what diffusers' quantizers import (bitsandbytes, peft,
# transformers; docs/benchmarks.md, second H100 call). Python's own per-module import times, once,
# in the background from the start (beside the GPU tests or the warm processes) and waited for
# before anything is timed (imports_done). BENCH_IMPORT_TIMES=1 or 0; default 1 on a machine with
# nvidia-smi.
GPU_BOX=0  # whether this machine has a GPU: what BENCH_IMPORT_TIMES and BENCH_WARM default to
if nvidia-smi -L >/dev/null 2>&1; then
    GPU_BOX=1
fi
IMPORT_PID=""
import_times() {
    timeout 120 "$PY" -X importtime -c "import bench.train_step" >/dev/null 2>"$RUNS/importtime.txt" || true
}
imports_done() {
    if [[ -z $IMPORT_PID ]]; then
        return 0
    fi
    wait "$IMPORT_PID" || true
    IMPORT_PID=""
    echo "== the slowest imports of a bench process (python -X importtime, in µs: self | with what it imports | module; runs/importtime.txt):"
    grep '^import time:' "$RUNS/importtime.txt" | sort -t'|' -k2 -n -r | head -n 12 | sed 's/^import time: */   /' || true
}
if [[ ${BENCH_IMPORT_TIMES:-$GPU_BOX} == 1 ]]; then
    import_times &
    IMPORT_PID=$!
fi

# Compiling ahead: a compiled run spends most of its time (100-150 s for SD1.5 on the H200) in
# torch.compile, on the CPU, while the GPU waits. So while the GPU tests run, BENCH_WARM processes
# at a time (default 4 on a machine with nvidia-smi, else 0: off) compile the selected compiled runs
# with --warm-only, in the order they will run (one wave, below), filling inductor's on-disk caches (FX graph,
# AOTAutograd, Triton kernels). The timed run then compiles from the cache, so it needs WARM_NEED_S
# instead of its own need; where a warm process failed it compiles itself, as before. A warm
# process skips cuDNN's algorithm timing, which would use the GPU. No run is timed while a warm
# process is alive (wait_for_warm): they would share the GPU and the CPU. Each warm process has its
# run's time limit, so one slow compile holds the timed runs back no longer. On the H100, four
# compiling SD1.5 bs16 at once took 178-197 s, next to the GPU tests.
WARM_JOBS=${BENCH_WARM:-$((GPU_BOX * 4))}
# On the H100 a run compiled from the cache took 45-73 s, 17-25 s of it the imports.
WARM_NEED_S=${BENCH_WARM_NEED_S:-70}
# A device machine stays warm a little while between calls, with inductor's caches in /tmp: a run
# compiled ahead in an earlier call on it is remembered here (its arguments, a hash of the code it
# runs and the cache folder), so a later call neither compiles it ahead again nor asks its full
# need. (On 2026-11-28 such a call, with BENCH_WARM=0, left two runs compiled minutes earlier "not
# run: needs 240 s".)
WARMED_DIR=${BENCH_WARMED_DIR:-/tmp/sdtune-warmed}
CODE_HASH=$(find sdtune bench -name '*.py' -print0 | sort -z | xargs -0 cat | sha1sum | cut -d' ' -f1)
warm_key() {  # NAME: what a run compiled ahead is remembered by
    printf '%s\n' "${RUN_ARGS[$1]} ${EXTRA[*]-} $CODE_HASH ${TORCHINDUCTOR_CACHE_DIR-}"
}
compiled_earlier() {  # NAME: whether an earlier call on this machine compiled NAME ahead, as it is now
    [[ -f $WARMED_DIR/$1 && $(cat "$WARMED_DIR/$1") == "$(warm_key "$1")" ]]
}
remember_compiled() {  # NAME: its graphs are in the caches now, for compiled_earlier in a later call
    mkdir -p "$WARMED_DIR" && warm_key "$1" >"$WARMED_DIR/$1"
}
# One wave: the first WARM_JOBS compiled runs, which compile beside the tests. A second wave would
# hold every timed run back until it ended (wait_for_warm), past the budget of a full plan.
for unit in "${UNITS[@]}"; do
    name=${unit#run:}
    if ((${#WARM[@]} < WARM_JOBS)) && [[ $unit == run:* && " ${RUN_ARGS[$name]} " == *" --compile "* ]] &&
        selected "$name" "" && ! compiled_earlier "$name"; then
        WARM+=("$name")
    fi
done
warm_all() {
    local name args
    for name in "${WARM[@]}"; do
        while (($(jobs -rp | wc -l) >= WARM_JOBS)); do
            wait -n || true
        done
        eval "args=(${RUN_ARGS[$name]})"
        (
            rc=0
            TORCHINDUCTOR_COMPILE_THREADS=3 timeout --kill-after=10 "${RUN_LIMITS[$name]}" "$PY" -m bench.train_step --warm-only \
                --name "$name" --json "$RUNS/$name.warm.json" "${args[@]}" "${EXTRA[@]}" >"$RUNS/$name.warm.log" 2>&1 || rc=$?
            echo "$rc" >"$RUNS/$name.warm.rc"
            if ((rc == 0)); then
                remember_compiled "$name"
            fi
        ) &
    done
    wait
}
# wait_for_warm: until every warm process has ended (or the budget is spent), so that a run is
# timed alone: on the H100 a compiled SD1.5 run timed next to three compiling warm processes took
# 182 ms a step, alone 118 ms.
wait_for_warm() {
    local began=$SECONDS name pending
    imports_done
    while ((SECONDS - start < BUDGET_S)); do
        pending=0
        for name in "${WARM[@]}"; do
            [[ -f $RUNS/$name.warm.rc ]] || pending=1
        done
        ((pending)) || break
        sleep 1
    done
    if ((SECONDS - began > 1)); then
        echo "== waited $((SECONDS - began))s for the warm processes to end"
    fi
}
# warmed NAME: says whether NAME's warm process compiled it; if so, lowers the caller's `need` (run's
# local) to WARM_NEED_S.
warmed() {
    local name=$1
    if [[ -f $RUNS/$name.warm.rc && $(cat "$RUNS/$name.warm.rc") == 0 ]]; then
        echo "== $name: compiled ahead ($(tail -n 1 "$RUNS/$name.warm.log"))"
        need=$((WARM_NEED_S < need ? WARM_NEED_S : need))
    else
        echo "== $name: not compiled ahead ($(tail -n 1 "$RUNS/$name.warm.log" 2>/dev/null || echo "no warm process")): compiles itself"
    fi
}
WARM_PID=""
if ((WARM_JOBS > 0 && ${#WARM[@]})); then
    echo "== compiling ahead, $WARM_JOBS at a time: ${WARM[*]}"
    warm_all &
    WARM_PID=$!
else
    WARM=()
fi

MODE=run
for UNIT in "${UNITS[@]}"; do
    if [[ $UNIT == tests ]]; then
        run_tests
    else
        plan
    fi
done

imports_done  # when nothing was timed
if [[ -n $WARM_PID ]]; then  # warm processes still compiling runs that will not run
    kill "$WARM_PID" 2>/dev/null || true
    pkill -f -- "-m bench.train_step --warm-only" 2>/dev/null || true
fi
if ((${#results[@]})); then
    "$PY" -m bench.table "${results[@]}" --json "$OUT/bench.json" --md "$OUT/bench.md" ||
        echo "bench.table failed (exit $?)"
else
    echo "no benchmark run selected: no bench.json or bench.md"
fi
# BENCH_PACK=1 (the device call sets it): the per-run logs and JSON as one tarball, since only a
# few files come back from such a machine.
if [[ -n ${BENCH_PACK:-} ]]; then
    tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$RUNS"
fi
if [[ -n $WARNING ]]; then
    echo "$WARNING"
fi
echo "total $((SECONDS - start))s; results in $OUT"
