#!/usr/bin/env bash
# Issue 19: the one-tile defaults (qkv / o / gate_up of FP8 and the 16-bit LM head as one
# whole-K tile a program) end to end, FP8 and bf16, then the GEMV GPU tests.
source scripts/device/setup.sh
for q in "--quantization fp8" "--dummy-weights" "--quantization fp8"; do
  timeout 110 python3 -m polymodal.cli bench --skip-hf --images 8 $q > $OUT/b.txt 2>&1
  echo "== $q"; grep -E "decode tok/s|fraction|TTFT ms|Error" $OUT/b.txt | head -4 | cut -c1-160
done
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py \
  tests/llm_core/test_gemv_gpu.py -k "fp8_linear or fp8_greedy or gemv" 2>&1 | grep -E "Error|passed|failed" | head -8
