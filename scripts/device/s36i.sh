#!/usr/bin/env bash
# Issue 19: s36h's best one-tile set (84.9% of the FP8 floor) with 8 warps, and with the
# 16-bit LM head as one whole-K tile too.
source scripts/device/setup.sh
for v in "qkv+o one tile, gate_up 8x4096" "one tile 8 warps" "one tile, gate_up 8w" "one tile + LM head 4x4096" "qkv+o one tile, gate_up 8x4096"; do
  timeout 110 python3 scripts/device/fp8_configs.py "$v" > $OUT/cfg.txt 2>&1
  grep -E "^==|decode tok/s|fraction|Error" $OUT/cfg.txt | head -3 | cut -c1-160
done
