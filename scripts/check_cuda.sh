#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/**/*.cu) with nvcc for sm_80 and sm_90, without linking
# and without a GPU. Works with the CPU-only torch wheel: it ships the ATen/c10 CUDA headers
# except the generated c10/cuda/impl/cuda_cmake_macros.h, for which a one-line stand-in is put in
# a temporary include folder searched after torch's own (ENVIRONMENT.md, "CUDA sources").
#
# Usage: bash scripts/check_cuda.sh [file.cu ...]   (default: every csrc/**/*.cu)
# nvcc: $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc (resolved), else the nvcc on PATH.
# With none at all it prints "SKIPPED: no nvcc" and exits 0, or, with CHECK_CUDA_REQUIRE=1 (as
# .ci/run sets it), fails; any compile error exits non-zero.
# CHECK_CUDA_JOBS (default 2, at most 2) files compile at a time; CHECK_CUDA_STD (default c++20, what torch 2.13 builds CUDA extensions with)
# picks the language standard.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "${CUDA_HOME}/bin/nvcc" ]; then
  nvcc="${CUDA_HOME}/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc="$(readlink -f /usr/local/cuda/bin/nvcc)"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc="$(command -v nvcc)"
fi
if [ -z "$nvcc" ]; then
  if [ "${CHECK_CUDA_REQUIRE:-0}" = 1 ]; then
    echo "FAILED: no nvcc, and CHECK_CUDA_REQUIRE=1 (set CUDA_HOME to a CUDA toolkit)" >&2
    exit 1
  fi
  echo "SKIPPED: no nvcc (set CUDA_HOME to a CUDA toolkit to compile-check the .cu files)"
  exit 0
fi

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if [ "$#" -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(find csrc -name '*.cu' | sort)
fi
if [ "${#files[@]}" -eq 0 ]; then
  echo "check_cuda: no .cu files under csrc/"
  exit 0
fi

# torch's include folders, C++ ABI and the nvcc flags its CUDAExtension adds by default.
mapfile -t torch_cfg < <("$PY" - <<'EOF'
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
print(" ".join("-I" + p for p in include_paths()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(" ".join(COMMON_NVCC_FLAGS))
print(torch.__version__)
EOF
)
torch_inc=${torch_cfg[0]}
abi=${torch_cfg[1]}
common_flags=${torch_cfg[2]}
torch_version=${torch_cfg[3]}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/include/c10/cuda/impl" "$tmp/logs"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/include/c10/cuda/impl/cuda_cmake_macros.h"

jobs=${CHECK_CUDA_JOBS:-2}
[ "$jobs" -ge 1 ] 2>/dev/null || jobs=2
[ "$jobs" -le 2 ] || jobs=2

echo "check_cuda: $("$nvcc" --version | tail -n 2 | head -n 1)"
echo "check_cuda: nvcc=$nvcc torch=$torch_version abi=$abi std=${CHECK_CUDA_STD:-c++20} jobs=$jobs files=${#files[@]}"

export CXX_STD="${CHECK_CUDA_STD:-c++20}"
export NVCC="$nvcc" TORCH_INC="$torch_inc" ABI="$abi" COMMON_FLAGS="$common_flags" TMPD="$tmp"
compile_one() {
  local f=$1 log start end rc
  log="$TMPD/logs/$(echo "$f" | tr '/' '_').log"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  if "$NVCC" -std="$CXX_STD" -O3 -Xcompiler -fPIC \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      $COMMON_FLAGS -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DDITO_FAST_WITH_CUDA \
      -Icsrc/include $TORCH_INC -I"$TMPD/include" \
      -c "$f" -o "$TMPD/$(basename "$f").o" >"$log" 2>&1; then
    rc=0
  else
    rc=1
  fi
  end=$(date +%s.%N)
  if [ "$rc" -eq 0 ]; then
    printf 'ok    %6.1f s  %s\n' "$(echo "$end - $start" | bc)" "$f"
    # Surface warnings about our own sources (torch's headers warn about C++20 features in c++17).
    if grep -i 'warning' "$log" | grep -q 'csrc/'; then sed 's/^/      /' "$log"; fi
  else
    printf 'FAIL  %6.1f s  %s\n' "$(echo "$end - $start" | bc)" "$f"
    sed 's/^/      /' "$log"
  fi
  return "$rc"
}
export -f compile_one

t0=$(date +%s.%N)
status=0
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} bash -c 'compile_one "$@"' _ {} || status=$?
t1=$(date +%s.%N)
printf 'check_cuda: %d file(s) in %.1f s wall\n' "${#files[@]}" "$(echo "$t1 - $t0" | bc)"
if [ "$status" -ne 0 ]; then
  echo "check_cuda: FAILED"
  exit 1
fi
echo "check_cuda: all CUDA sources compile"
