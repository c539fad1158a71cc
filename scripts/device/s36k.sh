#!/usr/bin/env bash
# The 16-bit LM head as one whole-K tile vs the tiled config before it, bf16 decode, alternating.
source scripts/device/setup.sh
for v in tiled one-tile tiled one-tile; do
  timeout 100 python3 scripts/device/lm_head_ab.py $v > $OUT/b.txt 2>&1
  grep -E "^==|decode tok/s|fraction|Error" $OUT/b.txt | head -3 | cut -c1-160
done
