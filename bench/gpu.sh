#!/usr/bin/env bash
# The GPU benchmark matrix in one go, for one H100/H200, in about 8 minutes:
#
#   bash bench/gpu.sh            # results in $OUT (default ./bench-out): bench.json, bench.md, runs/
#
# Each run is its own process under its own `timeout`, so a hang or an OOM costs that run only.
# Runs go in order of importance (the four targets first) and one that no longer fits the overall
# budget (BENCH_BUDGET_S, default 450 s) is skipped, not started; skipped and failed runs still
# appear in the table with the reason.
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

# Wheels for what the box may lack or have too old (diffusers, bitsandbytes): each is installed
# unless that very version is there, without deps or an index, since the box has no network.
install() {
    local whl dist version
    shopt -s nullglob
    for whl in bench/wheels/*.whl; do
        dist=$(basename "$whl" | cut -d- -f1)
        version=$(basename "$whl" | cut -d- -f2)
        if python -m pip show "$dist" 2>/dev/null | grep -qx "Version: $version"; then
            echo "have $dist $version"
        else
            python -m pip install -q --no-index --no-deps "$whl"
        fi
    done
    shopt -u nullglob
    # No build isolation: it would try to download setuptools. Running from the checkout works too.
    python -m pip install -q --no-deps --no-build-isolation -e . \
        || echo "warning: editable install failed; running sdtune from the checkout"
}
[[ -n ${BENCH_SKIP_INSTALL:-} ]] || install
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
if ! python -c "import torch, diffusers, peft, bitsandbytes; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" >"$OUT/versions.txt" 2>&1; then
    cat "$OUT/versions.txt"
    echo "missing packages; put the wheels the box lacks in bench/wheels/ (see docs/benchmarks.md)"
    exit 1
fi
cat "$OUT/versions.txt"
results=()

stub() {  # NAME MESSAGE: a result file that says why there are no numbers
    printf '{"name": "%s", "error": "%s"}\n' "$1" "$2" >"$RUNS/$1.json"
}

# run NAME TIMEOUT_S ARGS...: one bench.train_step process
run() {
    local name=$1 limit=$2 left rc
    shift 2
    left=$((BUDGET_S - (SECONDS - start)))
    results+=("$RUNS/$name.json")
    rm -f "$RUNS/$name.json"
    if ((left < 40)); then
        echo "== $name: skipped, ${left}s of the budget left"
        stub "$name" "skipped: out of time budget"
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo "== $name (timeout ${limit}s, ${left}s left)"
    rc=0
    timeout --kill-after=10 "$limit" python -m bench.train_step --name "$name" --json "$RUNS/$name.json" "$@" "${EXTRA[@]}" \
        >"$RUNS/$name.log" 2>&1 || rc=$?
    if ((rc == 0)); then
        tail -n 1 "$RUNS/$name.log"
    elif ((rc == 124 || rc == 137)); then
        echo "   timed out after ${limit}s (log: runs/$name.log)"
        stub "$name" "timed out after ${limit}s"
    else
        tail -n 3 "$RUNS/$name.log"
        stub "$name" "failed (exit $rc), see runs/$name.log"
    fi
}

SD15=(--arch sd15 --res 512)
STEPS=(--steps 10 --warmup 3)
# Compiled runs need more warm-up: the first steps compile forward, backward and recompile once.
CSTEPS=(--steps 10 --warmup 5)

# The four targets first, each with the eager run it is compared with.
run sd15-bs16-bf16 90 "${SD15[@]}" --bs 16 --precision bf16 "${STEPS[@]}"
run sd15-bs16-bf16-compile 200 "${SD15[@]}" --bs 16 --precision bf16 --compile "${CSTEPS[@]}"
run sd15-bs1-bf16 60 "${SD15[@]}" --bs 1 --precision bf16 "${STEPS[@]}"
run sd15-bs1-bf16-compile-cudagraphs 200 "${SD15[@]}" --bs 1 --precision bf16 --compile \
    --compile-mode reduce-overhead "${CSTEPS[@]}"
run sd35m-bs3-bf16 90 --arch sd35m --res 1024 --bs 3 --precision bf16 "${STEPS[@]}"
run sd35m-bs3-bf16-compile 180 --arch sd35m --res 1024 --bs 3 --precision bf16 --compile "${CSTEPS[@]}"
run sd35l-bs1-nf4-ckpt 120 --arch sd35l --res 1024 --bs 1 --precision bf16 --nf4 --checkpointing \
    --steps 5 --warmup 2
# The diffusers-example way, for the speedup column.
run sd15-bs16-baseline 90 "${SD15[@]}" --bs 16 --baseline "${STEPS[@]}"
run sd15-bs1-baseline 60 "${SD15[@]}" --bs 1 --baseline "${STEPS[@]}"
# The rest of the SD1.5 matrix: one change at a time from sd15-bs16-bf16.
run sd15-bs16-fp32 90 "${SD15[@]}" --bs 16 --precision fp32 "${STEPS[@]}"
run sd15-bs16-bf16-ckpt 60 "${SD15[@]}" --bs 16 --precision bf16 --checkpointing "${STEPS[@]}"
run sd15-bs16-bf16-adamw8bit 60 "${SD15[@]}" --bs 16 --precision bf16 --optimizer adamw8bit "${STEPS[@]}"
run sd15-bs16-bf16-channels-last 60 "${SD15[@]}" --bs 16 --precision bf16 --channels-last "${STEPS[@]}"
run sd15-bs16-bf16-math-attn 60 "${SD15[@]}" --bs 16 --precision bf16 --attention math "${STEPS[@]}"
run sd15-bs1-fp32 60 "${SD15[@]}" --bs 1 --precision fp32 "${STEPS[@]}"
run sd35l-bs1-nf4 120 --arch sd35l --res 1024 --bs 1 --precision bf16 --nf4 --steps 5 --warmup 2

python -m bench.table "${results[@]}" --json "$OUT/bench.json" --md "$OUT/bench.md"
echo "total $((SECONDS - start))s; results in $OUT"
