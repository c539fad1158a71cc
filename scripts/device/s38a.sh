#!/usr/bin/env bash
# Thirty-fifth session's first run. Issue 18: Gemma-3-12B-it's TTFT against its floor on this
# card (2.00x median on the H100), twice; issue 19: INT4 prefill throughput (512 images x one
# output token) AWQ against bf16.
source scripts/device/setup.sh
for i in 1 2; do
  timeout 120 python3 scripts/device/gemm_swap_ab.py linear > $OUT/bench.txt 2>&1
  grep -E "TTFT ms|floors|Error" $OUT/bench.txt | cut -c1-200
done
for q in "--quantization awq" "--dummy-weights"; do
  timeout 130 python3 -m polymodal.cli bench --skip-hf --images 512 --output-tokens 1 $q > $OUT/b.txt 2>&1
  echo "== $q"; grep -E "TTFT ms|captioning images/s|Error" $OUT/b.txt | head -3 | cut -c1-160
done
