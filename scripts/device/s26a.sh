#!/usr/bin/env bash
# Twenty-sixth session, first run: Gemma-3-12B's decode A/B of the three latency changes
# (scripts/device/gemma_s26.py), then the GPU tests of the two kernels they change.
source scripts/device/setup.sh
timeout 400 python3 scripts/device/gemma_s26.py gemma 2>&1 | grep -E "gemma:|Error|error" | tail -6
timeout 90 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "decode or sandwich" 2>&1 | tail -2
