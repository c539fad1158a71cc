#!/usr/bin/env bash
# Twenty-ninth session (issue 18): Llama 4's GPU tests, then the reduced Scout's bench next to
# transformers on the same weights (TTFT vs floor, decode, captioning).
source scripts/device/setup.sh
timeout 220 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_families_gpu.py \
  tests/sdk/test_vl_families_gpu.py tests/encoders/test_llama4_encoder.py -k llama4 2>&1 | tail -6
timeout 340 python3 -m polymodal.cli bench llama4-scout-reduced --dummy-weights \
  --json $OUT/llama4.json > $OUT/llama4_bench.txt 2>&1
echo "bench rc $?"; grep -v "^$" $OUT/llama4_bench.txt | grep -v Warning | tail -25 | cut -c1-200
