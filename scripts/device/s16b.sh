#!/usr/bin/env bash
# Sixteenth session, run b: the MoE decode profile, first-call host profiles (1080p, 64 frames),
# Phi-4-MM audio bench. Logs to $OUT.
source scripts/device/setup.sh
timeout 120 python3 scripts/bench_text_decode.py qwen3-30b-a3b --prompts 16 --tokens 16 \
  --profile --json $OUT/moe.json > $OUT/moe.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$' $OUT/moe.log | tail -30
timeout 170 python3 scripts/device/first_calls.py > $OUT/first_calls.log 2>&1
grep -v "^ *[0-9]* *0.000" $OUT/first_calls.log | cut -c1-150 | tail -75
timeout 280 python3 -m polymodal.cli bench phi-4-multimodal --dummy-weights --phi-workloads audio \
  --clips 64 --hf-clips 16 > $OUT/phi.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$' $OUT/phi.log | tail -12
