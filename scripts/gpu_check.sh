#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one prepared run (for a machine with a GPU, torch with CUDA
# and nvcc; nothing is downloaded): build dito_fast._C with its CUDA kernels in place, then run the
# whole test suite in parallel, so that the GPU-only cases (tests/ops/test_device_kernels.py's
# "cuda" cases, tests/test_gpu.py, tests/kernels/test_triton.py::test_kernels_on_cuda) run and
# everything else is checked against that machine's torch. Logs go to $OUT (default
# /tmp/dito_gpu_check): gpu.txt, build.log, tests.log, and junit.xml.
#
#   bash scripts/gpu_check.sh                 # build + tests; about 5-8 minutes on 16 cores
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" ...       # default: the visible GPU's architecture
#
# Exit status: the build's if it fails, else pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dito_gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

{
  nvidia-smi -L 2>&1 || true
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available()
      and torch.cuda.get_device_name())
EOF
} | tee "$OUT/gpu.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA GPU here" >&2; exit 2; }

# Build the extension in place (C++ and CUDA; DITO_FAST_USE_CUDA=1: fail rather than skip CUDA).
start=$(date +%s)
DITO_FAST_USE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?
echo "gpu_check: build exit $rc in $(( $(date +%s) - start )) s (log: $OUT/build.log)"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
"$PY" -c "import dito_fast._C as C; assert C.has_cuda(), 'built without CUDA kernels'; print('dito_fast._C: CUDA kernels built')" \
  || exit 3

# The suite, parallel when pytest-xdist is installed; -rs lists every skip with its reason.
par=()
if "$PY" -c "import xdist" 2>/dev/null; then par=(-n "${JOBS:-8}"); fi
start=$(date +%s)
"$PY" -m pytest tests -q -rs "${par[@]}" -p no:cacheprovider --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: tests exit $rc in $(( $(date +%s) - start )) s (log: $OUT/tests.log)"
exit $rc
