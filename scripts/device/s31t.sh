#!/usr/bin/env bash
# The GPU tests alone of the twenty-ninth session's two untested paths (a low device budget):
# the fresh chunk's pack launch, and Llama 4's tower (packed q/k/v, pair rotary, graphs).
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  -k "fresh_prefill or long_chunked" 2>&1 | tail -6
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/encoders/test_llama4_encoder.py \
  tests/sdk/test_vl_families_gpu.py -k "llama4" 2>&1 | tail -6
