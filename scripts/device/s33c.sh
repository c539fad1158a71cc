#!/usr/bin/env bash
# Issue 19: FP8 W8A16 decode at 330 tok/s (83.5%); down is 27.6 us against a 22.4 us floor:
# does SiLU*mul on load (each of 448 programs activating all 18944 inputs) cost it?
source scripts/device/setup.sh
for v in "default" "no SiLU fold" "no SiLU fold, down sums 8x4096" "no SiLU fold, down 16x1024 8w" \
  "no SiLU fold, down 8x2048 8w" "no SiLU fold, down sums 4x2048 2w" "default again"; do
  timeout 60 python3 scripts/device/fp8_configs.py "$v" > $OUT/fp8_configs.txt 2>&1
  grep -E "^==|decode tok/s|fraction of floor|Error" $OUT/fp8_configs.txt | cut -c1-160
done
