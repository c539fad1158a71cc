#!/usr/bin/env bash
# Issue 19: FP8 W8A16 decode fell from 324.3 to 292.2 tok/s with the per-row-sum configs of
# gate_up / down (s33a.sh): the end-to-end A/B of the one-row configs, then a profile.
source scripts/device/setup.sh
timeout 450 python3 scripts/device/fp8_configs.py > $OUT/fp8_configs.txt 2>&1
grep -E "^==|decode tok/s|fraction of floor|Error" $OUT/fp8_configs.txt | cut -c1-160
timeout 150 python3 -m polymodal.cli bench --skip-hf --images 8 --quantization fp8 --profile \
  > $OUT/fp8_profile.txt 2>&1; grep -E "decode tok/s|fraction" $OUT/fp8_profile.txt
