#!/usr/bin/env bash
# Twenty-seventh session, second run: where a fresh 1080p / 4K / 64-frame TTFT's time goes
# (`polymodal bench --workload media --profile`, whole output in $OUT/media.txt), then a long
# video's TTFT against the prefill chunk budget (scripts/device/chunk_ab.py).
source scripts/device/setup.sh
timeout 250 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 --profile \
  > ${OUT:-/tmp}/media.txt 2>&1
grep -A12 "^NVIDIA" ${OUT:-/tmp}/media.txt | head -14
timeout 320 python3 scripts/device/chunk_ab.py 2>&1 | grep -E "budget|Error|error" | tail -8
