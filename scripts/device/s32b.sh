#!/usr/bin/env bash
# Thirty-first session, second run: FP8 decode and captioning with one row W8A16 vs W8A8 vs bf16
# (issue 19: FP8 decode >= 85% of its floor, captioning >= 1.4x bf16), then the media bench
# (issue 15: 4K >= 70% with the pack launch, the 1080p repeat <= 8 ms with the M-RoPE cache).
source scripts/device/setup.sh
timeout 330 python3 scripts/device/fp8_ab.py > $OUT/fp8_ab.txt 2>&1
grep -E "^==|tok/s|images/s|TTFT|Error" $OUT/fp8_ab.txt | cut -c1-160 | head -24
timeout 200 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 \
  > $OUT/media.txt 2>&1; grep -A12 "^NVIDIA" $OUT/media.txt | head -14
