#!/usr/bin/env bash
# Thirty-sixth session (issue 15): the media bench beside transformers 5.17 on the same weights
# (the ">= 4x transformers" column for 448 px / 1080p / 4K / 64 frames in one run) and the
# repeats (the 1080p repeat's 8 ms target: 9.2-9.5 ms on an H100, 8.0-8.7 on an H200).
source scripts/device/setup.sh
timeout 560 python3 -m polymodal.cli bench --workload media --images 16 --json $OUT/media.json \
  > $OUT/media.txt 2>&1
grep -B2 -A10 "^NVIDIA" $OUT/media.txt | head -16; grep -E "Error|error" $OUT/media.txt | head -5
