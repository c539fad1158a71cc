#!/usr/bin/env bash
# Issue 18: Gemma-3-12B-it's TTFT with the 16-bit LM head one tile vs tiled, alternating.
source scripts/device/setup.sh
for v in tiled one-tile tiled one-tile; do
  timeout 100 python3 scripts/device/lm_head_ab.py $v gemma-3-12b-it > $OUT/b.txt 2>&1
  grep -E "^==|TTFT ms|floors|Error" $OUT/b.txt | cut -c1-130
done
