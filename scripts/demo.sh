#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine and run the demo: train dito-tiny on the
# built-in data (CPU, <= 10 minutes on 2 cores), then report reconstruction PSNR against the
# bicubic baseline. Usage: bash scripts/demo.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q "torch==${DITO_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[demo]"
.venv/bin/dito-fast demo "$@"
