#!/usr/bin/env bash
# Twenty-sixth session, first run: the decode latency A/B (scripts/device/gemma_s26.py), then
# the GPU tests the two kernels' changes touch.
source scripts/device/setup.sh
timeout 420 python3 scripts/device/gemma_s26.py both 2>&1 | grep -E "gemma:|qwen 7b:|Error|error" | tail -12
timeout 150 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "decode or sandwich" 2>&1 | tail -3
timeout 150 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_families_gpu.py \
  -k "gemma3 and (bf16_gemv or 4096)" 2>&1 | tail -3
