#!/usr/bin/env bash
# The one GPU script. On a machine with a CUDA GPU, a CUDA build of torch, triton, transformers, peft and pytest
# already installed (no network), from the repository root:
#     OUT=/some/empty/dir bash scripts/gpu_check.sh
# returns the whole truth in at most 8 files under $OUT (the rest in one logs.tar.gz) and prints a summary last:
#   summary.txt                   stages, ceilings, correctness, tests, timings, sweep and profile at a glance
#   <stem>.csv, <stem>.md         the GPU benchmark suite (also in benchmarks/results/; the README performance
#                                 section is regenerated from the CSV: python -m benchmarks.readme_section)
#   <stem>-ratio.png              time / base against the floor, every case
#   <stem>-correctness.md         every backend against float64, forward and every gradient, bf16 / fp16 / fp32
#   <stem>-profile.txt            per-kernel profile of one fwd+bwd per competitor at gate_proj
#   <stem>-sweep.md               the Triton tile sweep
#   logs.tar.gz                   every log, JSON and plot of the run
# <stem> = <device-slug>-<YYYY-MM-DD>. Stages (each under its own `timeout`, budgets in seconds, all of them inside
# one deadline of GPU_CHECK_BUDGET_S = 545 s; a stage gets min(its budget, what is left minus what the later stages
# need), and one that would get under 5 s is skipped and says so):
#   machine 20 | build of ilora_kernels._C in the background 240 (pip install -e, else scripts/build_inplace.py)
#   while it builds: ceilings 30 | correctness reference+triton 90 | Triton sweep 75 | pytest Triton+reference 60
#   after it: correctness cuda 60 | pytest cuda 45 | benchmark suite 200 | profile 40 | summary and files 15
# GPU_CHECK_DRY_RUN=1 rehearses all of it on a CPU-only machine: tiny CPU stand-ins (the cpu backend for cuda,
# Triton under TRITON_INTERPRET=1, no CUDA graphs), no compile (the build stage only checks the extension that is
# already there), results in a temporary folder; it fails when more than 8 files land in $OUT.
# One stage alone: see benchmarks/README.md ("The GPU check").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
fi
OUT=${OUT:-}
BUDGET_S=${GPU_CHECK_BUDGET_S:-545}
MAX_RETURNED=8
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET_S))

if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh needs a CUDA device and a CUDA build of torch ($PY); GPU_CHECK_DRY_RUN=1 rehearses it on CPU" >&2
  exit 2
fi

if [ "$DRY" = 1 ]; then
  WORK=${GPU_CHECK_WORK:-$(mktemp -d)/gpu-check}
  RESULTS=$WORK/results
  DRY_FLAG=(--dry-run)
  export TRITON_INTERPRET=1   # before any Python process imports triton
else
  WORK=${GPU_CHECK_WORK:-build/gpu-check}
  RESULTS=benchmarks/results
  DRY_FLAG=()
fi
rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS"
STAGES=$WORK/stages.tsv
: > "$STAGES"
STEM=$("$PY" -m benchmarks.gpu_common stem ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} 2> "$WORK/stem.log") \
  || STEM=unknown-device-$(date -u +%F)

now() { date +%s; }
elapsed() { echo $(($(now) - T0)); }
banner() { echo; echo "=== [$(elapsed)s] $*"; }
# stage_budget MAX RESERVE: min(MAX, seconds left before the deadline minus RESERVE for the stages after this one)
stage_budget() {
  local b=$((DEADLINE - $(now) - $2))
  [ "$b" -gt "$1" ] && b=$1
  echo "$b"
}
# record NAME STATUS SECONDS BUDGET NOTE: one line of stages.tsv (the summary's stage table)
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$STAGES"; }
status_of() {  # the status word of an exit code
  case "$1" in
    0) echo ok ;;
    124 | 137) echo TIMEOUT ;;
    *) echo "FAILED (rc $1)" ;;
  esac
}
# run_stage NAME MAX RESERVE LOG TAIL cmd...: runs cmd under `timeout` with the stage's budget (also exported as
# STAGE_BUDGET for cmd's own --budget-s), output to LOG, prints the last TAIL lines; returns cmd's exit code
run_stage() {
  local name=$1 max=$2 reserve=$3 log=$4 tail_n=$5
  shift 5
  local b
  b=$(stage_budget "$max" "$reserve")
  banner "$name (budget ${b}s)"
  if [ "$b" -lt 5 ]; then
    record "$name" skipped 0 "$b" "no time left before the deadline"
    echo "skipped: no time left"
    return 0
  fi
  local t rc
  t=$(now)
  STAGE_BUDGET=$b timeout -k 5 "$b" "$@" > "$log" 2>&1
  rc=$?
  record "$name" "$(status_of "$rc")" "$(($(now) - t))" "$b" "$(basename "$log")"
  tail -n "$tail_n" "$log"
  return "$rc"
}
inner_budget() { echo $(($1 > 20 ? $1 - 10 : ($1 > 2 ? $1 / 2 : 1))); }  # a Python stage's own budget in its timeout

# reserves (seconds) the later stages keep for themselves
R_PACK=15
R_PROFILE=$((25 + R_PACK))
R_SUITE=$((120 + R_PROFILE))
R_CUDA_TESTS=$((30 + R_SUITE))
R_CUDA_CORRECT=$((40 + R_CUDA_TESTS))
FAILED_STAGES=0
note_rc() { [ "$1" -eq 0 ] || FAILED_STAGES=$((FAILED_STAGES + 1)); }

PYTEST_ARGS=(-v -p no:cacheprovider -o addopts= -rfEs --maxfail=30)  # -v: a killed run still shows its tests
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=120); fi

# ---------------------------------------------------------------------------------------------------------------
banner "machine ($([ "$DRY" = 1 ] && echo 'DRY RUN on CPU stand-ins' || echo GPU); work folder $WORK)"
{
  if [ "$DRY" = 1 ]; then
    echo "DRY RUN on $(uname -n): $(nproc) CPUs, no GPU used"
  else
    timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
      --format=csv,noheader 2>&1 || echo "nvidia-smi unavailable"
  fi
  timeout 20 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name() if
torch.cuda.is_available() else 'no CUDA device')" 2>&1
  echo "$(nproc) CPU cores; stem $STEM"
} | tee "$WORK/machine.txt"
record machine ok "$(elapsed)" 20 machine.txt

# ---------------------------------------------------------------------------------------------------------------
# the CUDA extension, built once, in the background (niced: the Triton stages compile on the same cores)
BUILD_MAX=240
build_extension() {
  local start rc left
  start=$(now)
  if [ "$DRY" = 1 ]; then  # no compile here: check the extension this checkout already has
    timeout -k 5 60 "$PY" -c "from ilora_kernels import _extension as e; ok = e.load()
print('dry run: no build; existing ilora_kernels._C:', 'loads, CUDA kernels ' + ('in' if e.cuda_built() else 'not in')
      if ok else e.unavailable_reason())" > "$WORK/build.log" 2>&1
    rc=$?
    echo "$([ $rc = 0 ] && echo ok || echo failed) dry-run-check $(($(now) - start))" > "$WORK/build.status"
    return
  fi
  local arch
  arch=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability()
print(f'{m}.{n}' + ('a' if m == 9 else ''))")  # sm_90a on Hopper
  local env_vars=(CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" ILORA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch"
    MAX_JOBS="${MAX_JOBS:-16}")
  echo "pip install -e . with ${env_vars[*]}" > "$WORK/build.log"
  env "${env_vars[@]}" timeout -k 5 $((BUILD_MAX - 40)) nice -n 10 "$PY" -m pip install --no-deps \
    --no-build-isolation --no-index -e . >> "$WORK/build.log" 2>&1 && cuda_extension_loads
  rc=$?
  local route=pip
  if [ $rc != 0 ]; then
    # pip could not build (e.g. a setuptools too old for pyproject.toml) or its build does not load: build the
    # extension in place instead (the same sources and switches, no packaging)
    left=$((start + BUILD_MAX - $(now)))
    route=inplace
    echo "pip route failed (rc $rc); scripts/build_inplace.py with ${left}s left" >> "$WORK/build.log"
    env "${env_vars[@]}" timeout -k 5 $((left > 10 ? left : 10)) nice -n 10 "$PY" scripts/build_inplace.py \
      >> "$WORK/build.log" 2>&1 && cuda_extension_loads
    rc=$?
  fi
  echo "$([ $rc = 0 ] && echo ok || echo failed) $route $(($(now) - start))" > "$WORK/build.status"
}
cuda_extension_loads() {  # the built ilora_kernels._C imports and has its CUDA kernels
  timeout 60 "$PY" -c "import sys; from ilora_kernels import _extension as e
ok = e.load() and e.cuda_built(); print('ilora_kernels._C:', 'CUDA kernels load' if ok else e.unavailable_reason())
sys.exit(0 if ok else 1)" >> "$WORK/build.log" 2>&1
}
banner "build of ilora_kernels._C started in the background (budget ${BUILD_MAX}s, log build.log)"
if [ "$DRY" != 1 ]; then rm -f ilora_kernels/_C*.so; fi  # a stale build must not stand in for this one
build_extension &
BUILD_PID=$!

# ---------------------------------------------------------------------------------------------------------------
# while it builds: what needs no extension (Triton and the reference backend)
R_FG=$R_CUDA_CORRECT
run_stage ceilings 30 "$R_FG" "$WORK/ceilings.log" 12 \
  "$PY" -m benchmarks.gpu_ceilings ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} \
  --out-md "$WORK/ceilings.md" --out-json "$WORK/ceilings.json"
note_rc $?

B=$(stage_budget 90 "$R_FG")
run_stage "correctness reference+triton" 90 "$R_FG" "$WORK/correctness-a.log" 14 \
  "$PY" -m benchmarks.gpu_correctness ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} --backends reference,triton \
  --budget-s "$(inner_budget "$B")" --out-md "$WORK/correctness-a.md" --out-json "$WORK/correctness-a.json"
note_rc $?

B=$(stage_budget 75 "$R_FG")
run_stage "triton tile sweep" 75 "$R_FG" "$WORK/sweep.log" 4 \
  "$PY" -m benchmarks.gpu_sweep ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} --budget-s "$(inner_budget "$B")" \
  --out-md "$WORK/sweep.md" --out-json "$WORK/sweep.json"
note_rc $?

run_stage "pytest triton+reference" 60 "$R_FG" "$WORK/pytest-triton.log" 3 \
  "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_triton_backend.py tests/test_reference.py
note_rc $?

# ---------------------------------------------------------------------------------------------------------------
banner "waiting for the build"
wait "$BUILD_PID"
read -r BUILD_STATE BUILD_ROUTE BUILD_SECS 2>/dev/null < "$WORK/build.status" || BUILD_STATE=failed
record "build ($([ "$DRY" = 1 ] && echo 'dry run: existing _C' || echo "${BUILD_ROUTE:-?}"))" \
  "$([ "$BUILD_STATE" = ok ] && echo ok || echo FAILED)" "${BUILD_SECS:-?}" "$BUILD_MAX" build.log
tail -n 4 "$WORK/build.log"
[ "$BUILD_STATE" = ok ] || { echo "BUILD FAILED: the cuda backend is unavailable (the other stages go on)"; note_rc 1; }
if [ "$BUILD_STATE" = ok ] && [ "${BUILD_ROUTE:-}" = inplace ]; then  # the in-place build is used from the checkout
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout 30 "$PY" -m ilora_kernels.env > "$WORK/env.txt" 2>&1
grep -E "^  (triton|cuda|cpu|reference) " "$WORK/env.txt"

# ---------------------------------------------------------------------------------------------------------------
# after it: the cuda backend, then every competitor
if [ "$BUILD_STATE" = ok ]; then
  B=$(stage_budget 60 "$R_CUDA_TESTS")
  run_stage "correctness cuda" 60 "$R_CUDA_TESTS" "$WORK/correctness-b.log" 8 \
    "$PY" -m benchmarks.gpu_correctness ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} --backends cuda \
    --budget-s "$(inner_budget "$B")" --out-md "$WORK/correctness-b.md" --out-json "$WORK/correctness-b.json"
  note_rc $?
  run_stage "pytest cuda" 45 "$R_SUITE" "$WORK/pytest-cuda.log" 3 \
    "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_cuda_backend.py
  note_rc $?
else
  record "correctness cuda" skipped 0 0 "build failed"
  record "pytest cuda" skipped 0 0 "build failed"
fi

SUITE_ARGS=(--suite gpu --no-train --out "$RESULTS" --stem "$STEM" --preamble "$WORK/ceilings.md")
if [ "$DRY" = 1 ]; then  # a few stand-in cases are enough to exercise the plumbing
  SUITE_ARGS+=(--dry-run --only '^qwen\.(gate|k)_proj .*(N=4096 r=128 K=3( p=0\.1)?|N=(1|16) r=128 K=3 decode)$')
fi
# a backend that broke the CUDA context in its correctness stage would take every later row of the suite with it:
# its rows say so instead
CONTEXT_KILLERS="illegal memory access|device-side assert|unspecified launch failure|misaligned address"
if grep -q -E "$CONTEXT_KILLERS" "$WORK/correctness-b.log" "$WORK/pytest-cuda.log" 2>/dev/null; then
  SUITE_ARGS+=(--skip "cuda=it broke the CUDA context in an earlier stage (correctness-b.log, pytest-cuda.log)")
  echo "the cuda backend broke the CUDA context earlier: its timing rows say so instead of running it"
fi
if grep -q -E "$CONTEXT_KILLERS" "$WORK/correctness-a.log" 2>/dev/null; then
  SUITE_ARGS+=(--skip "triton=it broke the CUDA context in the correctness stage (correctness-a.log)")
  echo "the triton backend broke the CUDA context earlier: its timing rows say so instead of running it"
fi
B=$(stage_budget 200 "$R_PROFILE")  # the suite's own case budget leaves 35 s for start-up, the last case and plots
run_stage "benchmark suite" 200 "$R_PROFILE" "$WORK/suite.log" 0 \
  "$PY" -m benchmarks.run "${SUITE_ARGS[@]}" --budget-s "$((B > 45 ? B - 35 : 5))"
note_rc $?
grep -E "^\[[0-9]+/[0-9]+\]" "$WORK/suite.log" | tail -n 40

run_stage "profile" 40 "$R_PACK" "$WORK/profile.log" 2 \
  "$PY" -m benchmarks.gpu_profile ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} \
  --out-txt "$WORK/profile.txt" --out-json "$WORK/profile.json"
note_rc $?

# ---------------------------------------------------------------------------------------------------------------
banner "summary and the returned files"
RETURN_DIR=$WORK/return
mkdir -p "$RETURN_DIR"
cp "$WORK/sweep.md" "$RETURN_DIR/$STEM-sweep.md" 2>/dev/null
cp "$WORK/profile.txt" "$RETURN_DIR/$STEM-profile.txt" 2>/dev/null
for suffix in .csv .md -ratio.png; do cp "$RESULTS/$STEM$suffix" "$RETURN_DIR/" 2>/dev/null; done
RETURNED=(summary.txt "$STEM.csv" "$STEM.md" "$STEM-ratio.png" "$STEM-correctness.md" "$STEM-profile.txt"
  "$STEM-sweep.md" logs.tar.gz)
record "summary and files" ok "$(elapsed)" "$BUDGET_S" "total seconds so far"
timeout 60 "$PY" -m benchmarks.gpu_summary --work "$WORK" --csv "$RESULTS/$STEM.csv" --out "$RETURN_DIR/summary.txt" \
  --correctness-md "$RETURN_DIR/$STEM-correctness.md" --returned "${RETURNED[*]}" --elapsed-s "$(elapsed)" \
  --budget-s "$BUDGET_S" ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} > "$WORK/summary.log" 2>&1 \
  || { echo "the summary failed:"; tail -n 20 "$WORK/summary.log"; note_rc 1; }
# everything else of the run (logs, JSON, the other plots) in one archive
for suffix in -time.png -memory.png; do cp "$RESULTS/$STEM$suffix" "$WORK/" 2>/dev/null; done
tar -czf "$RETURN_DIR/logs.tar.gz" -C "$(dirname "$WORK")" --exclude "$(basename "$WORK")/return" \
  "$(basename "$WORK")" 2>> "$WORK/summary.log" || echo "tar failed (see summary.log)"

RC=0
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  for f in "${RETURNED[@]}"; do [ -f "$RETURN_DIR/$f" ] && cp "$RETURN_DIR/$f" "$OUT/"; done
  N_OUT=$(find "$OUT" -mindepth 1 | wc -l)
  if [ "$N_OUT" -gt "$MAX_RETURNED" ]; then
    echo "ERROR: $N_OUT entries under \$OUT, more than the $MAX_RETURNED that come back" >&2
    RC=3
  fi
  WHERE="\$OUT ($OUT): $N_OUT files"
else
  WHERE="$RETURN_DIR (set OUT to copy them)"
fi

cat "$RETURN_DIR/summary.txt" 2>/dev/null || echo "(no summary.txt)"
SKIPPED_STAGES=$(awk -F '\t' '$2 == "skipped"' "$STAGES" | wc -l)
echo "returned: $WHERE; results also in $RESULTS/$STEM.*; failed or timed-out stages: $FAILED_STAGES;" \
  "skipped: $SKIPPED_STAGES; total $(elapsed)s"
if [ "$RC" = 0 ] && [ "$FAILED_STAGES" -gt 0 ]; then RC=1; fi
exit "$RC"
