#!/usr/bin/env bash
# Next session's second run (written in the thirty-fourth): bf16 batch-1 decode (94.5% of its
# floor on the H100) with qkv / o / gate_up as one whole-K tile a program, as FP8's gained
# 4.5% from it; alternating, one process each.
source scripts/device/setup.sh
for v in default one-tile one-tile-8 default one-tile; do
  timeout 100 python3 scripts/device/bf16_one_tile_ab.py $v > $OUT/b.txt 2>&1
  grep -E "^==|decode tok/s|fraction|Error" $OUT/b.txt | head -3 | cut -c1-160
done
