#!/usr/bin/env bash
# The project's test command (README). GPU tests skip themselves without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q --timeout=900 "$@"
