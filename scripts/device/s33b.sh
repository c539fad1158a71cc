#!/usr/bin/env bash
# Issue 19: FP8 W8A16 decode fell from 324.3 to 292.2 tok/s with the per-row-sum configs of
# gate_up / down (s33a.sh): the end-to-end A/B of the one-row configs, each in its own process.
source scripts/device/setup.sh
for v in "default" "down 16x1024 8w" "gate_up sums 8x1024" "gate_up sums 4x2048" \
  "gate_up sums 4x512 1w" "qkv sums 4x1024 2w" "o sums 4x1024 2w" "default again"; do
  timeout 60 python3 scripts/device/fp8_configs.py "$v" > $OUT/fp8_configs.txt 2>&1
  grep -E "^==|decode tok/s|fraction of floor|Error" $OUT/fp8_configs.txt | cut -c1-160
done
