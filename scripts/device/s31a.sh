#!/usr/bin/env bash
# Next session's first run (written after the twenty-ninth session's device budget was spent):
# s30d.sh's GPU tests of the fresh chunk's pack launch and of the Llama 4 tower, the reduced
# Llama 4 bench, then the pack launch's A/B on fresh 1080p and 4K images (one engine).
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  -k "fresh_prefill or long_chunked" 2>&1 | tail -6
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/encoders/test_llama4_encoder.py \
  tests/sdk/test_vl_families_gpu.py -k "llama4" 2>&1 | tail -6
timeout 90 python3 -m polymodal.cli bench llama4-scout-reduced --dummy-weights --skip-hf \
  --profile > $OUT/llama4.txt 2>&1
grep -E "ours vs|TTFT ms|decode ms|captioning|floors" $OUT/llama4.txt | cut -c1-220
grep -A14 "TTFT of one" $OUT/llama4.txt | cut -c1-160
timeout 250 python3 scripts/device/pack_ab.py 2>&1 | grep -E "^pack|Error"
