#!/usr/bin/env bash
# Issue 19: s36g's best (qkv, o, gate_up each one whole-K tile a program: 336.4-336.7 tok/s vs
# 324.0, 84.9% of the floor) again, and its neighbours (wider gate_up, narrower qkv / o).
source scripts/device/setup.sh
for v in "qkv+o one tile, gate_up 8x4096" "one tile, gate_up 16x4096 8w" "one tile, o 4x4096 2w" "one tile, qkv+o 4x4096 2w" "default"; do
  timeout 110 python3 scripts/device/fp8_configs.py "$v" > $OUT/cfg.txt 2>&1
  grep -E "^==|decode tok/s|fraction|Error" $OUT/cfg.txt | head -3 | cut -c1-160
done
