#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one prepared run (for a machine with a GPU, torch with CUDA
# and nvcc; nothing is downloaded): build dito_fast._C with its CUDA kernels in place, run the
# tests, optionally the GPU benchmarks. The checkout is put on PYTHONPATH, so the package needs no
# install (the tests' subprocesses, torchrun's workers and the CLI find it too).
#
#   bash scripts/gpu_check.sh             # build + the whole suite (the GPU cases run, the rest is
#                                         # checked against that machine's torch); ~5-8 min, 16 cores
#   bash scripts/gpu_check.sh gpu         # build + only the files with GPU cases (tests/ops/
#                                         # test_device_kernels.py, tests/test_gpu.py, tests/models/
#                                         # test_backends.py, tests/test_cli_decode.py, tests/ops/
#                                         # test_ops_ref.py, the Triton cases on the GPU)
#   bash scripts/gpu_check.sh gpu bench   # ... then benchmarks/bench_gpu.py and its tables
#   bash scripts/gpu_check.sh all "" -k cuda   # arguments after the first two go to the tests' pytest
#
# Environment: OUT (logs; default /tmp/dito_gpu_check: gpu.txt, build.log, tests.log, junit.xml,
# triton.log, bench_gpu_{model,ops}.json and .md, bench_*.log), PYTHON, TORCH_CUDA_ARCH_LIST (default: the visible
# GPU's architecture), JOBS (pytest-xdist workers, default 8), TEST_TIMEOUT / BENCH_TIMEOUT
# (seconds for each phase; default none).
# Exit status: the build's if it fails, else the first failing phase's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dito_gpu_check}
PY=${PYTHON:-python3}
SCOPE=${1:-all}
BENCH=${2:-}
shift $(( $# < 2 ? $# : 2 ))
case "$SCOPE" in all|gpu) ;; *) echo "gpu_check: scope must be 'all' or 'gpu', not '$SCOPE'" >&2; exit 64;; esac
case "$BENCH" in ""|bench) ;; *) echo "gpu_check: the second argument must be 'bench' or empty, not '$BENCH'" >&2; exit 64;; esac
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi -L 2>&1 || true
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available()
      and torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF
} | tee "$OUT/gpu.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA GPU here" >&2; exit 2; }

# Build the extension in place (C++ and CUDA; DITO_FAST_USE_CUDA=1: fail rather than skip CUDA).
start=$(date +%s)
DITO_FAST_USE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?
echo "gpu_check: build exit $rc in $(( $(date +%s) - start )) s (log: $OUT/build.log)"
if [ $rc -ne 0 ]; then grep -n -m 40 "error" "$OUT/build.log"; tail -20 "$OUT/build.log"; exit $rc; fi
"$PY" -c "import dito_fast._C as C; assert C.has_cuda(), 'built without CUDA kernels'; print('dito_fast._C: CUDA kernels built')" \
  || exit 3

limit() {  # limit SECONDS CMD...: CMD under `timeout` when SECONDS is set; SIGINT first, so that
  # pytest still writes its summary, junit and benchmark JSON
  if [ -n "$1" ]; then timeout -s INT -k 30 "$1" "${@:2}"; else "${@:2}"; fi
}

# The tests, parallel when pytest-xdist is installed; -rfEs lists every failure, error and skip.
par=()
if "$PY" -c "import xdist" 2>/dev/null; then par=(-n "${JOBS:-8}"); fi
status=0
start=$(date +%s)
if [ "$SCOPE" = gpu ]; then
  limit "${TEST_TIMEOUT:-}" env DITO_FAST_TRITON_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs "${par[@]}" -p no:cacheprovider \
    tests/kernels/triton_interpret_cases.py >"$OUT/triton.log" 2>&1
  rc=$?; tail -5 "$OUT/triton.log"; [ $rc -ne 0 ] && grep -m 30 "^FAILED\|^ERROR" "$OUT/triton.log"
  [ $rc -ne 0 ] && status=$rc
  files=(tests/ops/test_device_kernels.py tests/test_gpu.py tests/models/test_backends.py tests/test_cli_decode.py
         tests/ops/test_ops_ref.py)
else
  files=(tests)
fi
limit "${TEST_TIMEOUT:-}" "$PY" -m pytest "${files[@]}" -q -rfEs "${par[@]}" -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" "$@" >"$OUT/tests.log" 2>&1
rc=$?
grep -m 60 "^FAILED\|^ERROR" "$OUT/tests.log"; tail -3 "$OUT/tests.log"
echo "gpu_check: tests exit $rc in $(( $(date +%s) - start )) s (log: $OUT/tests.log)"
[ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc

if [ "$BENCH" = bench ]; then
  # the model rows first (the fewer and the more telling), then the ops' rows
  for part in model ops; do
    sel=$([ $part = model ] && echo "gpu_model or fast_decode" || echo "not gpu_model and not fast_decode")
    start=$(date +%s)
    limit "${BENCH_TIMEOUT:-}" "$PY" -m pytest benchmarks/bench_gpu.py -k "$sel" -q -p no:cacheprovider \
      --benchmark-json="$OUT/bench_gpu_$part.json" >"$OUT/bench_$part.log" 2>&1
    rc=$?
    grep -m 30 "^FAILED\|^ERROR" "$OUT/bench_$part.log"; tail -2 "$OUT/bench_$part.log"
    echo "gpu_check: bench ($part) exit $rc in $(( $(date +%s) - start )) s (log: $OUT/bench_$part.log)"
    [ -s "$OUT/bench_gpu_$part.json" ] && "$PY" benchmarks/report.py "$OUT/bench_gpu_$part.json" | tee "$OUT/bench_gpu_$part.md"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  done
fi
exit $status
