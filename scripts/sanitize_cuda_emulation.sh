#!/usr/bin/env bash
# The CUDA kernels (host emulation of tests/test_cuda_emulation.py) under ThreadSanitizer, then AddressSanitizer.
# In the emulation every CUDA thread is a host thread: a missing __syncwarp is a data race TSan reports, an
# out-of-bounds index is a heap overflow ASan reports. Exit status 1 on any report or test failure. ~3 min on 2 cores.
#
#   [PYTHON=...] [SANITIZE_K="pytest -k expression"] scripts/sanitize_cuda_emulation.sh
#
# Needs GCC's libtsan / libasan (x86-64 Linux). Without them it says so and exits 0, or 1 when CI=true.
# `make test` runs it on a subset (SANITIZE_K); `make sanitize` runs every emulation test.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
lib() { "${CXX:-g++}" -print-file-name="$1"; }
TSAN_LIB="$(lib libtsan.so)" ASAN_LIB="$(lib libasan.so)" STDCXX_LIB="$(lib libstdc++.so)"
for f in "$TSAN_LIB" "$ASAN_LIB"; do
  if [[ "$f" != /* || ! -e "$f" ]]; then
    echo "sanitize_cuda_emulation: skipped, no sanitizer runtime ($f; install GCC's libtsan and libasan)" >&2
    case "${CI:-}" in 1|true|yes) exit 1 ;; *) exit 0 ;; esac
  fi
done
SELECT=()
[[ -n "${SANITIZE_K:-}" ]] && SELECT=(-k "$SANITIZE_K")
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
status=0

run() {  # name, compiler flags, preload, runtime options variable assignment
  local name="$1" flags="$2" preload="$3" opts="$4"
  export ILORA_CUDA_EMULATION_FLAGS="$flags" ILORA_CUDA_EMULATION_DIR="$WORK/$name" OMP_NUM_THREADS=1
  # step 1 builds the extension; loading it then fails without the runtime preloaded, which is expected
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py -k launch_counts >/dev/null 2>&1
  [[ -e "$WORK/$name/ilora_cuda_emulation.so" ]] || { echo "FAIL $name: the build failed"; status=1; return; }
  # step 2 runs every emulation test with the runtime preloaded; -s so that a report reaches the log
  env LD_PRELOAD="$preload" "$opts" "$PY" -m pytest -q -s -p no:cacheprovider tests/test_cuda_emulation.py \
    "${SELECT[@]}" >"$WORK/$name.log" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]] || grep -q "Sanitizer" "$WORK/$name.log"; then
    echo "FAIL $name (pytest exit $rc):"
    grep -m 20 -A 12 "Sanitizer" "$WORK/$name.log" || tail -n 30 "$WORK/$name.log"
    status=1
  else
    echo "ok   $name: $(grep -E '[0-9]+ passed' "$WORK/$name.log" | tail -n 1)"
  fi
}

run tsan "-fsanitize=thread -g" "$TSAN_LIB" "TSAN_OPTIONS=halt_on_error=1 report_signal_unsafe=0"
run asan "-fsanitize=address -fno-omit-frame-pointer -g" "$ASAN_LIB $STDCXX_LIB" \
  "ASAN_OPTIONS=detect_leaks=0:halt_on_error=1"
exit $status
