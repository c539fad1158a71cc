#!/usr/bin/env bash
# Thirty-first session, fourth run (issue 18): where a Gemma 3 TTFT goes (2.27x its floor on the
# H100): the host timeline without the profiler, the bench's kernel profile, SDPA's head-dim pad.
source scripts/device/setup.sh
timeout 150 python3 scripts/device/vl_host_timeline.py gemma-3-12b-it 2>&1 | tail -22
timeout 170 python3 -m polymodal.cli bench gemma-3-12b-it --dummy-weights --skip-hf --images 8 \
  --profile > $OUT/gemma_profile.txt 2>&1
grep -A30 "TTFT of one" $OUT/gemma_profile.txt | cut -c1-170 | head -34
timeout 200 python3 scripts/device/sdpa_pad.py > $OUT/sdpa_pad.txt 2>&1
grep -E "^sdpa|Error" $OUT/sdpa_pad.txt | tr '|' '\n' | head -30
