#!/usr/bin/env bash
# Twenty-sixth session, first run: Gemma-3-12B's decode A/B of the two latency changes
# (scripts/device/gemma_s26.py), then the GPU tests the two kernels' changes touch.
source scripts/device/setup.sh
timeout 400 python3 scripts/device/gemma_s26.py gemma 2>&1 | grep -E "gemma:|Error|error" | tail -6
timeout 80 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "decode or sandwich" 2>&1 | tail -2
timeout 100 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_families_gpu.py \
  -k "gemma3 and (bf16_gemv or 4096)" 2>&1 | tail -2
