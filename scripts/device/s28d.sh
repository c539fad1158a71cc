#!/usr/bin/env bash
# Next session, fourth run (issue 15): the media bench's profile (whole output in
# $OUT/media.txt): fresh 1080p / 4K / 64-frame TTFTs with the pixels read in place, and a 1080p
# repeat (target <= 8 ms: 8.9-10.2 ms on the H200) with the engine thread's work in its gaps.
source scripts/device/setup.sh
timeout 280 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 --profile \
  > ${OUT:-/tmp}/media.txt 2>&1
grep -A12 "^NVIDIA" ${OUT:-/tmp}/media.txt | head -14
grep -A40 "the same input again" ${OUT:-/tmp}/media.txt | cut -c1-140 | head -45
