#!/usr/bin/env bash
# Next session's first run (written in the thirty-fourth). Issue 19, FP8 captioning 1.23x bf16
# at 128 images (target 1.4x): decode batches of 65-128 rows on the Triton GEMM with each
# shape's best tile at 128 rows (the sweep: 130.7 us a layer vs cuBLAS 147.7; down split-K 4),
# against the default (cuBLAS above 64 rows), alternating, one process each; then bf16.
source scripts/device/setup.sh
for v in "one pass" triton128 "one pass" triton128 bf16; do
  timeout 110 python3 scripts/device/fp8_quant_ab.py "$v" 128 > $OUT/ab.txt 2>&1
  grep -E "^==|decode tok/s|TTFT ms|images/s|Error" $OUT/ab.txt | cut -c1-160
done
