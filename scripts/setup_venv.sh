#!/usr/bin/env bash
# Create .venv (if missing) on a fresh machine and install the package with the given extra.
# Usage: bash scripts/setup_venv.sh EXTRA   (EXTRA: test, demo, ...)
set -euo pipefail
if [ "$#" -ne 1 ]; then
  echo "usage: bash scripts/setup_venv.sh EXTRA   (EXTRA: test, demo, ...)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
# Pin torch exactly: a range can pull a multi-GB CUDA build (ENVIRONMENT.md).
# DITO_TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) picks the index torch comes from:
# from plain PyPI on Linux the pin is the CUDA build.
.venv/bin/python -m pip install -q ${DITO_TORCH_INDEX_URL:+--index-url "$DITO_TORCH_INDEX_URL"} \
  "torch==${DITO_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[$1]"
