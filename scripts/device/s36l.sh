#!/usr/bin/env bash
# Issue 18: Gemma-3-12B-it's TTFT against its floor with the one-tile LM head, twice.
source scripts/device/setup.sh
for i in 1 2; do
  timeout 120 python3 scripts/device/gemm_swap_ab.py linear > $OUT/bench.txt 2>&1
  grep -E "TTFT ms|floors|Error" $OUT/bench.txt | cut -c1-200
done
