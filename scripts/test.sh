#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine (Python 3.10+ and the package registries only)
# and run the test suite. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
.venv/bin/python -m pytest tests -q "$@"
