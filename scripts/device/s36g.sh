#!/usr/bin/env bash
# Issue 19: after s36f (o / qkv as one whole-K tile: 324.1 -> 328.2 / 329.8 tok/s), the same
# for gate_up (one 4096-wide tile a program: its loads issued before the wait, during o), and
# qkv on 16 x 4096 tiles; the new pair and the default as baselines.
source scripts/device/setup.sh
for v in "qkv+o one tile 8x4096 sums" "qkv+o+gate_up one tile" "qkv+o one tile, gate_up 8x4096" "qkv 16x4096 8w + o one tile" "default"; do
  timeout 110 python3 scripts/device/fp8_configs.py "$v" > $OUT/cfg.txt 2>&1
  grep -E "^==|tok/s|Error" $OUT/cfg.txt | head -3 | cut -c1-160
done
