#!/usr/bin/env bash
# Twenty-ninth session, last run: GPU tests of the fresh chunk's pack launch and of the Llama 4
# tower (packed qkv, pair rotary launch, graphs), then the reduced Llama 4 bench and the media
# bench (4K: the pack launch's effect).
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  -k "fresh_prefill or long_chunked" 2>&1 | tail -2
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/encoders/test_llama4_encoder.py \
  tests/sdk/test_vl_families_gpu.py -k "llama4" 2>&1 | tail -2
timeout 80 python3 -m polymodal.cli bench llama4-scout-reduced --dummy-weights --skip-hf \
  2>&1 | grep -A5 "ours vs"
timeout 150 python3 -m polymodal.cli bench --workload media --skip-hf --images 8 2>&1 \
  | grep -A5 "^NVIDIA"
