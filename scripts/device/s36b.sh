#!/usr/bin/env bash
# Next session's second run (written in the thirty-third). Issue 19: FP8 against bf16
# captioning at the bench's default 512 images (decode batches up to 256 rows: cuBLAS's FP8
# GEMMs, 165.6 us a 7B layer at 256 rows against ~77 of weight reads), alternating, one
# process each; the target is 1.4x (1.23x at 128 images in the thirty-third session).
source scripts/device/setup.sh
for v in "one pass" bf16 "one pass" bf16; do
  timeout 140 python3 scripts/device/fp8_quant_ab.py "$v" 512 > $OUT/ab.txt 2>&1
  grep -E "^==|tok/s|TTFT ms|images/s|Error" $OUT/ab.txt | cut -c1-160
done
