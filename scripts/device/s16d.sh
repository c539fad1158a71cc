#!/usr/bin/env bash
# Sixteenth session, run d: the merged trial branch's benches: Qwen3-MoE decode after the tiled
# defaults, the media workload (first calls under the SDPA shape policy + load warm-up, 64-frame
# fresh calls, 1080p captioning vs floor), NVILA vs its transformers-composed reference. Logs: $OUT.
source scripts/device/setup.sh
timeout 85 python3 scripts/bench_text_decode.py qwen3-30b-a3b --prompts 16 --tokens 16 \
  --json $OUT/moe.json > $OUT/moe.log 2>&1
python3 -c "import json; r=json.load(open('$OUT/moe.json')); print({k: r[k] for k in ('decode_ms', 'decode_floor_ms', 'decode_of_floor')})"
timeout 215 python3 -m polymodal.cli bench --workload media --skip-hf --json $OUT/media.json \
  > $OUT/media.log 2>&1
grep -i "warm-up" $OUT/media.log | head -3; grep -v '^ *"\|^ *[]}{,]*$\|^[a-z0-9]*: {' $OUT/media.log | tail -12
timeout 115 python3 -m polymodal.cli bench nvila-8b --dummy-weights --images 32 --hf-images 8 \
  --json $OUT/nvila.json > $OUT/nvila.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$' $OUT/nvila.log | tail -22
