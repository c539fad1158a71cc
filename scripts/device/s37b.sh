#!/usr/bin/env bash
# Next session's second run (written in the thirty-fourth): bf16 batch-1 decode (94.5% of its
# floor on the H100) with qkv / o / gate_up as one whole-K tile a program, as FP8's gained
# 4.5% from it; alternating, one process each; then Qwen3-30B-A3B's decode.
source scripts/device/setup.sh
for v in default one-tile one-tile-8 default one-tile; do
  timeout 100 python3 scripts/device/bf16_one_tile_ab.py $v > $OUT/b.txt 2>&1
  grep -E "^==|decode tok/s|fraction|Error" $OUT/b.txt | head -3 | cut -c1-160
done
# Qwen3-30B-A3B (issue 17: 66.3% of its floor, target 75%): its qkv (K 2048), o (K 4096) and
# LM head run the 16-bit one-row GEMV too
for v in default one-tile; do
  timeout 150 python3 scripts/device/bf16_one_tile_ab.py $v qwen3-30b-a3b > $OUT/m.txt 2>&1
  grep -E "^==|^batch-1 decode|Error" $OUT/m.txt | head -2 | cut -c1-160
done
