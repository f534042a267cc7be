#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds dito_fast._C
# with DITO_FAST_SANITIZE (setup.py: -fsanitize=..., -O1 -g, every error fatal) in a scratch copy
# of this checkout's tracked files (the working tree's contents; the checkout's own build is left
# alone), then runs tests against that build with the sanitizer runtime preloaded into Python.
# Reads or writes out of a tensor's bounds, into freed memory, signed overflow, misaligned or
# out-of-range shifts and conversions in our code stop the run with a report (torch itself is not
# instrumented). The Triton kernels' tests (tests/kernels) are not run: none of our C++ runs there.
#
#   bash scripts/sanitize_check.sh                  # tests/ops and tests/models, then tests/ops on
#                                                   # the AVX2 and the plain builds of the kernels
#                                                   # (~6.5 min on 2 cores)
#   bash scripts/sanitize_check.sh tests/ops -k group_norm   # pytest arguments instead
#
# Environment: PYTHON (the interpreter whose torch is built against; default python3),
# DITO_FAST_SANITIZE (default address,undefined), CXX (default c++; GCC: the runtimes preloaded
# are found with its -print-file-name), KEEP=1 keeps the scratch copy (also kept when the check
# fails; its path is printed).
# Exit status: 0 when every test passed with no sanitizer report; 1 when the build failed, the
# sanitized module did not load, a runtime library is missing or a report was written (the reports,
# $WORK/sanitizer.*, are printed at the end); else pytest's (a report aborts the process: 134).
set -euo pipefail
PY=${PYTHON:-python3}
if [[ "$PY" == */* ]]; then  # relative to the caller's folder; a venv's link kept (no realpath)
  py_dir=$(cd "$(dirname "$PY")" && pwd) || { echo "sanitize_check: no folder for PYTHON=$PY" >&2; exit 1; }
  PY="$py_dir/$(basename "$PY")"
fi
cd "$(dirname "$0")/.."
CXX_BIN=${CXX:-c++}
SAN=$(echo "${DITO_FAST_SANITIZE:-address,undefined}" | tr 'A-Z' 'a-z' | tr -d '[:space:]')  # as setup.py reads it
WORK=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/dito_sanitize.XXXXXX")" && pwd -P)  # physical: compared with module paths
status=1  # until the end is reached
cleanup() {
  if compgen -G "$WORK/sanitizer*" > /dev/null; then
    echo "sanitize_check: sanitizer report(s):" >&2
    head -60 "$WORK"/sanitizer* >&2
  fi
  if [ "${KEEP:-0}" = 1 ] || [ "$status" -ne 0 ]; then echo "sanitize_check: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
echo "sanitize_check: scratch copy $WORK ($SAN)"
git ls-files -z | tar --null -T - -cf - | tar -C "$WORK" -xf -

cd "$WORK"
DITO_FAST_USE_CUDA=0 DITO_FAST_SANITIZE="$SAN" "$PY" setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -30 build.log; echo "sanitize_check: the build failed ($WORK/build.log)" >&2; exit 1; }

preload=()
case ",$SAN," in  # (setup.py refuses thread with address)
  *,address,*) preload+=("$("$CXX_BIN" -print-file-name=libasan.so)") ;;
  *,thread,*) preload+=("$("$CXX_BIN" -print-file-name=libtsan.so)") ;;
esac
# With ASan preloaded before the C++ runtime, its __cxa_throw interceptor finds no real function
# and the first C++ exception (every TORCH_CHECK the bad-input tests provoke) aborts: preload both.
preload+=("$("$CXX_BIN" -print-file-name=libstdc++.so)")
for lib in "${preload[@]}"; do
  [ -f "$lib" ] || { echo "sanitize_check: $lib not found (the compiler's sanitizer runtime)" >&2; exit 1; }
done

# detect_leaks=0: CPython and torch keep memory alive to the end by design (not our leaks)
in_sanitized_env() {
  LD_PRELOAD="${preload[*]}" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$WORK/sanitizer" \
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$WORK/sanitizer" \
    PYTHONPATH="$WORK" \
    "$@"
}
# The kernels' tests skip without the extension: make sure it is this build and it loads.
DITO_SANITIZE_WORK="$WORK" in_sanitized_env "$PY" -c "
import dito_fast.ops._cpp as c, os
assert c.AVAILABLE, c.LOAD_ERROR
want = os.path.join(os.environ['DITO_SANITIZE_WORK'], 'dito_fast')
assert os.path.realpath(os.path.dirname(c._C.__file__)) == os.path.realpath(want), c._C.__file__
" || { echo "sanitize_check: the sanitized dito_fast._C did not load" >&2; exit 1; }

status=0
if [ $# -gt 0 ]; then
  in_sanitized_env "$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
else
  # the kernels this CPU runs, then tests/ops again on the narrower builds of each kernel unit
  # (other vector widths, other tails), as ATEN_CPU_CAPABILITY picks them
  in_sanitized_env "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/models || status=$?
  for cap in avx2 default; do
    [ "$status" -ne 0 ] && break
    echo "sanitize_check: tests/ops with ATEN_CPU_CAPABILITY=$cap"
    ATEN_CPU_CAPABILITY=$cap in_sanitized_env "$PY" -m pytest -q -p no:cacheprovider tests/ops || status=$?
  done
fi
if compgen -G "$WORK/sanitizer*" > /dev/null && [ "$status" -eq 0 ]; then
  status=1  # a report without a failed test (printed by cleanup)
fi
exit "$status"
