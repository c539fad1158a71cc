#!/usr/bin/env bash
# Next session's second run (written in the thirty-fifth): the 16-bit one-tile default on
# Gemma-3-12B's decode (K 3840 / 4096; not measured when it became the default) against the
# tiles before it, alternating; then Qwen3-30B-A3B (issue 17) with the same A/B, once each.
source scripts/device/setup.sh
for v in default tiled default tiled; do
  timeout 100 python3 scripts/device/bf16_one_tile_ab.py $v gemma-3-12b > $OUT/g.txt 2>&1
  echo "== $v"; grep -E -i "decode|Error" $OUT/g.txt | head -3 | cut -c1-160
done
for v in tiled default; do
  timeout 130 python3 scripts/device/bf16_one_tile_ab.py $v qwen3-30b-a3b > $OUT/m.txt 2>&1
  echo "== moe $v"; grep -E "^batch-1 decode|Error" $OUT/m.txt | head -2 | cut -c1-160
done
