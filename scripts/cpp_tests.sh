#!/usr/bin/env bash
# The standalone CMake build (CMakeLists.txt: the _C module, libdito_fast_ops for C++ programs) and
# its C++ unit tests (tests/cpp, through ctest): the shared math and vector helpers of every
# instruction set this CPU runs, and the ops called from C++ (dito_fast/ops.h) against ATen.
#
#   bash scripts/cpp_tests.sh                # Release build in build/cmake-tests (~1.5 min on 2 cores
#                                            # from scratch), then ctest
#   DITO_FAST_SANITIZE=address,undefined bash scripts/cpp_tests.sh   # the same under those sanitizers
#                                            # (RelWithDebInfo, build/cmake-tests-sanitize; no preload
#                                            # needed: the tests are a C++ program)
#
# Environment: PYTHON (the interpreter whose torch is built against; default .venv/bin/python when
# present, else python3), BUILD_DIR (default above), CMAKE_ARGS (more -D options, e.g.
# -DDITO_FAST_USE_CUDA=ON; CUDA is off by default: the tests run the CPU kernels), JOBS (default 2).
# Exit status: 0 when every test passed (or was skipped: an instruction set this CPU lacks), else
# the failing step's (configure, build or ctest).
set -euo pipefail
PY=${PYTHON:-}
if [[ "$PY" == */* ]]; then  # relative to the caller's folder; absolute for CMake, a venv's link kept
  PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
cd "$(dirname "$0")/.."
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"; else PY=$(command -v python3); fi
fi
SAN=${DITO_FAST_SANITIZE:-}
if [ -n "$SAN" ]; then
  BUILD=${BUILD_DIR:-build/cmake-tests-sanitize}
  TYPE=RelWithDebInfo
else
  BUILD=${BUILD_DIR:-build/cmake-tests}
  TYPE=Release
fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
mkdir -p "$BUILD"
start=$(date +%s)
# shellcheck disable=SC2086  # CMAKE_ARGS: several words
cmake -S . -B "$BUILD" "${generator[@]}" -DPython3_EXECUTABLE="$PY" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE="$TYPE" -DDITO_FAST_USE_CUDA=OFF -DDITO_FAST_SANITIZE="$SAN" -DDITO_FAST_BUILD_TESTS=ON \
  ${CMAKE_ARGS:-} > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "${JOBS:-2}"
echo "cpp_tests: built in $(( $(date +%s) - start )) s"
ctest --test-dir "$BUILD" --output-on-failure
