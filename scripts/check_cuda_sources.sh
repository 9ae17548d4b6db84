#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc (no GPU needed) for sm_80 and sm_90a, with torch's include paths and
# the defines torch's CUDAExtension uses, into a temporary directory.  Exit status 1 on any compile error or on
# any warning located in OUR sources (a diagnostic line that starts with a path under csrc/).  Warnings whose
# location is inside torch's / CUDA's own headers are filtered out (printed as a count only); gcc's "In
# instantiation of ... required from here" context lines are not counted either.  ptxas reports (-Xptxas -v) the
# registers, stack and spills of every kernel per architecture: printed as a table, and a kernel that spills fails.
#
#   [VERBOSE=1] scripts/check_cuda_sources.sh      (VERBOSE=1 also prints the filtered warnings; uses .venv/bin/python if present, else python3; NVCC / CUDA_HOME honoured)
set -uo pipefail
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
NVCC="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
if [[ ! -x "$NVCC" ]] && ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_sources: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 1
fi

# torch's include paths, C++ ABI and language standard (torch >= 2.10 headers require C++20)
read -r -a INCLUDES <<<"$("$PY" -c "
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths()))")" || { echo "check_cuda_sources: cannot import torch with $PY" >&2; exit 1; }
ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
TORCH_VERSION="$("$PY" -c "import torch; print(torch.__version__)")"
STD=c++17
ATEN_H="$("$PY" -c "import torch.utils.cpp_extension as c, os; print(os.path.join(c.include_paths()[0], 'ATen', 'ATen.h'))")"
if grep -q "C++20 or later" "$ATEN_H" 2>/dev/null; then STD=c++20; fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda_sources: no csrc/cuda/*.cu files"
  exit 0
fi

echo "check_cuda_sources: nvcc $("$NVCC" --version | grep -o 'release [0-9.]*'), torch $TORCH_VERSION, -std=$STD," \
  "-D_GLIBCXX_USE_CXX11_ABI=$ABI, archs sm_80 + sm_90a"
status=0
for src in "${SOURCES[@]}"; do
  rel="${src#"$ROOT"/}"
  log="$OUT/$(basename "$src").log"
  "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
    -std="$STD" -O3 --expt-relaxed-constexpr -lineinfo \
    -DILORA_WITH_CUDA "-DILORA_TORCH_VERSION=\"$TORCH_VERSION\"" -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
    -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ \
    --compiler-options "-fPIC,-Wall,-Wextra" -Xcudafe --display_error_number -Xptxas -v \
    "${INCLUDES[@]}" >"$log" 2>&1
  rc=$?
  # diagnostics located in our sources: "<path under csrc>(line): warning" (cudafe) or "<path>:line:col: warning" (gcc)
  ours="$(grep -E "^(${ROOT}/)?csrc/[^:(]*(\([0-9]+\)|:[0-9]+(:[0-9]+)?):? *(warning|error)" "$log" || true)"
  all_warnings="$(grep -cE "warning" "$log" || true)"
  if [[ $rc -ne 0 ]]; then
    echo "FAIL $rel: nvcc exited with $rc"
    cat "$log"
    status=1
  elif [[ -n "$ours" ]]; then
    echo "FAIL $rel: warnings in our sources"
    echo "$ours"
    status=1
  else
    if [[ -n "${VERBOSE:-}" ]]; then grep -E "warning" "$log" | sed 's/^/  filtered: /'; fi
    echo "ok   $rel (sm_80, sm_90a; $all_warnings warning lines from torch/CUDA headers filtered)"
    # ptxas -v: "Compiling entry function '<mangled>' for 'sm_XX'", then the function's stack / spill line and its
    # "Used N registers" line
    if ! "$PY" - "$log" <<'PYEOF'
import re, shutil, subprocess, sys
rows, cur = [], None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_[0-9a-z]+)'", line)
    if m:
        cur = {"name": m.group(1), "arch": m.group(2), "stack": 0, "stores": 0, "loads": 0, "regs": None}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["stores"], cur["loads"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
names = sorted({r["name"] for r in rows})
pretty = dict(zip(names, names))
if names and shutil.which("c++filt"):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    for n, p in zip(names, out):
        pretty[n] = p.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
spills = [r for r in rows if r["stores"] or r["loads"]]
print(f"  {'kernel':<58} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11}")
for r in sorted(rows, key=lambda r: (pretty[r["name"]], r["arch"])):
    print(f"  {pretty[r['name']][:58]:<58} {r['arch']:<7} {r['regs'] or 0:>4} {r['stack']:>5} "
          f"{str(r['stores']) + '/' + str(r['loads']):>11}")
if not rows:
    print("  (ptxas printed no kernel table)")
if spills:
    print(f"FAIL: {len(spills)} kernel(s) spill registers")
sys.exit(1 if spills else 0)
PYEOF
    then
      status=1
    fi
  fi
done
exit $status
