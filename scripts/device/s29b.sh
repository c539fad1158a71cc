#!/usr/bin/env bash
# Twenty-eighth session, third run (issue 15): the media bench with transformers beside it (the
# 4x targets), then its profile (whole output in $OUT/media.txt): fresh 1080p / 4K / 64-frame
# TTFTs and a 1080p repeat (target <= 8 ms) with the engine thread's work in its gaps.
source scripts/device/setup.sh
timeout 270 python3 -m polymodal.cli bench --workload media --images 16 2>&1 | grep -v ": {" | tail -12
timeout 270 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 --profile \
  > ${OUT:-/tmp}/media.txt 2>&1
grep -A12 "^NVIDIA" ${OUT:-/tmp}/media.txt | head -14
grep -A40 "the same input again" ${OUT:-/tmp}/media.txt | cut -c1-140 | head -45
