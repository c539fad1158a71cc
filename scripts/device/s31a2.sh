#!/usr/bin/env bash
# s31a without the pack launch's A/B (a shorter first run when the device budget is low): the
# GPU tests of the fresh chunk's pack launch and of Llama 4's tower, the reduced Llama 4 bench.
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  -k "fresh_prefill or long_chunked" 2>&1 | tail -6
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/encoders/test_llama4_encoder.py \
  tests/sdk/test_vl_families_gpu.py -k "llama4" 2>&1 | tail -6
timeout 100 python3 -m polymodal.cli bench llama4-scout-reduced --dummy-weights --skip-hf \
  --profile > $OUT/llama4.txt 2>&1
grep -E "ours vs|TTFT ms|decode ms|captioning|floors" $OUT/llama4.txt | cut -c1-220
grep -A14 "TTFT of one" $OUT/llama4.txt | cut -c1-160
