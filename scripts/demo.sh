#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine and run the demo: train dito-tiny on the
# built-in data (CPU, under 10 minutes on 2 cores), then report reconstruction PSNR against the
# bicubic baseline. Usage: bash scripts/demo.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh demo
.venv/bin/dito-fast demo "$@"
