#!/usr/bin/env bash
# Sixteenth session, run a (~9 minutes): time the fifteenth session's untimed merges (MoE decode,
# Gemma 3 TTFT fusions) and the 64-frame video with the causal SDPA route.
source scripts/device/setup.sh
timeout 120 python3 scripts/bench_text_decode.py qwen3-30b-a3b --prompts 16 --tokens 16 \
  --profile --json /tmp/moe.json > /tmp/moe.log 2>&1
grep -v '^ *"' /tmp/moe.log | tail -28
timeout 120 python3 -m polymodal.cli bench gemma-3-12b-it --skip-hf --images 16 --output-tokens 16 \
  --profile --json /tmp/gemma.json > /tmp/gemma.log 2>&1
sed -n '/^TTFT of one/,/^{/p' /tmp/gemma.log | head -26
python3 -c "import json; r=json.load(open('/tmp/gemma.json')); print({k: r.get(k) for k in ('ttft_floor_ms', 'prompt_tokens', 'decode_floor_ms')}, r['ours'])"
timeout 220 python3 -m polymodal.cli bench --workload media --skip-hf > /tmp/media.log 2>&1
grep -v '^ *"\|^ *[]}{]' /tmp/media.log | tail -14
timeout 90 python3 scripts/bench_moe.py --only decode --decode-tokens 1,2 --sweep > /tmp/sweep.log 2>&1
tail -30 /tmp/sweep.log
