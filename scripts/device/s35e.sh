#!/usr/bin/env bash
# Issue 19: FP8 decode batches on the Triton narrow tiles vs cuBLAS in the engine at 32 and 64
# images (decode batches of 32 / 64 rows), alternating.
source scripts/device/setup.sh
for n in 32 64; do
  for v in "one pass" cublas "one pass" cublas; do
    timeout 100 python3 scripts/device/fp8_quant_ab.py "$v" $n > $OUT/ab.txt 2>&1
    echo "$n $(grep -E "^==|images/s|Error" $OUT/ab.txt | tr '\n' ' ' | cut -c1-160)"
  done
done
