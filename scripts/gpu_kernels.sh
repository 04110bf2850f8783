#!/usr/bin/env bash
# The Triton kernels on a CUDA GPU: correctness (tests/test_triton_cuda.py), then speed against dense SDPA and
# compiled FlexAttention (`sparse-dit bench kernels`). About two minutes on an H200.
#
#   OUT=/some/folder bash scripts/gpu_kernels.sh
#
# Run from anywhere in the repo, with python3 able to import torch, triton and sparse_dit's dependencies (this
# adds src/ to PYTHONPATH). Every step has its own time limit, cut to what is left of BUDGET seconds (default
# 150) after keeping time for the steps after it, so a hang in one step cannot eat the others. Writes four
# files to $OUT:
#   env.txt                   GPU, driver, python, torch, triton; each step's exit status and seconds
#   triton_cuda_tests.txt     pytest output with a table of errors per case
#   bench_kernels_h200.json   one record per benchmark case, triton then flex (written after every case)
#   bench_kernels_h200.txt    the benchmark tables
# Overrides for a smaller or local run: BUDGET, PYTHON, DEVICE (the benchmarks' device, cuda), TRITON_BENCH and
# FLEX_BENCH (the benchmarks' arguments; FLEX_BENCH=skip skips FlexAttention). The tests need CUDA (else skip).
set -u
: "${OUT:?set OUT to an output folder}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
BUDGET=${BUDGET:-150}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
unset TRITON_INTERPRET  # the kernels must compile, not run in the interpreter
START=$SECONDS
ENV_TXT=$OUT/env.txt TESTS_TXT=$OUT/triton_cuda_tests.txt
BENCH_JSON=$OUT/bench_kernels_h200.json BENCH_TXT=$OUT/bench_kernels_h200.txt
FLEX_JSON=$(mktemp /tmp/bench_flex.XXXXXX.json)
: >"$ENV_TXT"; : >"$TESTS_TXT"; : >"$BENCH_TXT"; rm -f "$BENCH_JSON" "$FLEX_JSON"

# limit CAP RESERVE: CAP seconds, or less so that RESERVE seconds of the budget stay for the later steps.
limit() { local rest=$((BUDGET - (SECONDS - START) - $2)); echo $(($1 < rest ? $1 : rest)); }

STATUS=()
# step NAME LIMIT LOG CMD...: run CMD under `timeout` (which signals its whole process group), output to LOG.
step() {
    local name=$1 lim=$2 log=$3 t=$SECONDS rc
    shift 3
    if ((lim < 15)); then
        echo "== $name: skipped, ${lim}s left of the ${BUDGET}s budget" | tee -a "$log"
        STATUS+=("$name: skipped (budget)")
        return
    fi
    echo "== $name (limit ${lim}s): $*" | tee -a "$log"
    timeout -k 5 "$lim" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    STATUS+=("$name: exit $rc after $((SECONDS - t))s$( ((rc == 124 || rc == 137)) && echo " (TIMED OUT at ${lim}s)")")
}

# 1. The machine and the software.
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  budget: ${BUDGET}s"
    timeout 20 nvidia-smi -L
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    timeout 60 "$PY" - <<'EOF'
import sys, platform
import torch, triton
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("triton", triton.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import sparse_dit
print("sparse_dit", sparse_dit.__version__, sparse_dit.__file__)
EOF
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
} >>"$ENV_TXT" 2>&1
cat "$ENV_TXT"

# 2. Correctness: every kernel variant against the torch reference, fp16 and bf16 (about 40 s: compiles).
#    The test's own worker timeout fires first, so pytest reports which cases finished.
lim=$(limit 90 55)
SPARSE_DIT_CUDA_TIMEOUT=$((lim - 15)) \
    step "triton CUDA tests" "$lim" "$TESTS_TXT" "$PY" -m pytest -q tests/test_triton_cuda.py -p no:cacheprovider

# 3. Speed: the Triton kernel against dense SDPA, bf16 (32 cases, about 40 s). Density 1.0 shows how the
#    kernel compares with SDPA when both compute everything.
read -r -a TRITON_ARGS <<<"${TRITON_BENCH:---backend triton --dtype bfloat16 --heads 16 --seq 16384,32768 --head-dim 64,128 --block 64,128 --density 0.1,0.2,0.3,1.0 --reps 15 --warmup 3}"
step "bench triton" "$(limit 80 0)" "$BENCH_TXT" \
    "$PY" -m sparse_dit.cli bench kernels --device "$DEVICE" "${TRITON_ARGS[@]}" --json "$BENCH_JSON"

# 4. Compiled FlexAttention on the same cases, where time is left (each shape compiles for 10-30 s).
FLEX_BENCH=${FLEX_BENCH:---backend flex --dtype bfloat16 --heads 16 --seq 16384 --head-dim 128 --block 128 --density 0.1,0.2,0.3 --reps 10 --warmup 3}
if [ "$FLEX_BENCH" != skip ]; then
    read -r -a FLEX_ARGS <<<"$FLEX_BENCH"
    step "bench flex" "$(limit 60 0)" "$BENCH_TXT" \
        "$PY" -m sparse_dit.cli bench kernels --device "$DEVICE" "${FLEX_ARGS[@]}" --json "$FLEX_JSON"
fi
timeout 30 "$PY" - "$BENCH_JSON" "$FLEX_JSON" <<'EOF'
import json, pathlib, sys
paths = [pathlib.Path(p) for p in sys.argv[1:]]
records = [r for p in paths if p.exists() and p.stat().st_size for r in json.loads(p.read_text())]
paths[0].write_text(json.dumps(records, indent=2))
print(f"{len(records)} benchmark records in {paths[0]}")
EOF
rm -f "$FLEX_JSON"

# Summary: step status, the test verdicts and the benchmark tables (what a caller sees last).
{
    echo "== steps (total $((SECONDS - START))s of ${BUDGET}s)"
    printf '%s\n' "${STATUS[@]}"
} | tee -a "$ENV_TXT"
echo "== tests"
grep -E "passed|failed|error|skipped" "$TESTS_TXT" | tail -n 3
grep -E "^(FAILED|ERROR) " "$TESTS_TXT" | head -n 20
echo "== benchmarks"
grep -E "^ *(seq|[0-9]+ ) |^device " "$BENCH_TXT"
