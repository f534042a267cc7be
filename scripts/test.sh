#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine (Python 3.10+ and the package registries only)
# and run the test suite. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
# Pin torch exactly: a range can pull a multi-GB CUDA build (ENVIRONMENT.md).
.venv/bin/python -m pip install -q "torch==${DITO_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
.venv/bin/python -m pytest tests -q "$@"
