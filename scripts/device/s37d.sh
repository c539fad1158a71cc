#!/usr/bin/env bash
# Next session's fourth run (written in the thirty-fourth). Issue 19, INT4 batch-1 decode
# (~1.5x bf16, target 2.8x): the one-row INT4 GEMVs with one K tile a program (K split into
# single 128-wide groups: every program's loads before the PDL wait), engine A/B per variant
# (`int4_configs.py`), the default first and last.
source scripts/device/setup.sh
for v in "default" "o one tile" "qkv+o one tile" "qkv+o+gate_up one tile" "qkv+o one tile, gate_up 2 tiles" "all, down 4 tiles" "default again"; do
  timeout 80 python3 scripts/device/int4_configs.py "$v" > $OUT/cfg.txt 2>&1
  grep -E "^==|decode tok/s|fraction|Error" $OUT/cfg.txt | head -3 | cut -c1-160
done
