#!/usr/bin/env bash
# Next session's second run (written in the thirty-second). Issue 19: W8A8's activation
# quantization read once a row vs two passes at 128 images, twice (46.4 vs 48.4 images/s at 64
# in one run each), then bf16.
source scripts/device/setup.sh
for v in "one pass" "two passes" "one pass" "two passes" "bf16"; do
  timeout 100 python3 scripts/device/fp8_quant_ab.py "$v" 128 > $OUT/ab.txt 2>&1
  grep -E "^==|tok/s|TTFT ms|images/s|fraction of floor|Error" $OUT/ab.txt | cut -c1-160
done
