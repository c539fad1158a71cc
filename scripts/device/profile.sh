#!/usr/bin/env bash
# Where the time goes on the device (~8 minutes): kernel tables of Qwen3-30B-A3B batch-1 decode,
# Gemma-3-12B-it's TTFT of one image, and AWQ / FP8 batch-1 decode of the 7B config.
#   run(command="bash scripts/device/profile.sh", carry=[".whl"])   after scripts/device/wheels.sh
source scripts/device/setup.sh
timeout 150 python3 scripts/bench_text_decode.py qwen3-30b-a3b --prompts 64 --tokens 32 \
  --profile --json /tmp/moe.json 2>&1 | grep -v "^ *\"" | tail -40
timeout 150 python3 -m polymodal.cli bench gemma-3-12b-it --skip-hf --images 16 --output-tokens 16 \
  --profile --json /tmp/gemma.json 2>&1 | grep -v "^ *\"\|^ *[]}{]" | tail -40
python3 -c "import json; r=json.load(open('/tmp/gemma.json')); print({k: r[k] for k in ('ttft_floor_ms', 'ttft_tflop', 'prompt_tokens') if k in r}, r['ours'])"
for q in awq fp8; do
  timeout 100 python3 -m polymodal.cli bench --skip-hf --images 32 --quantization $q --profile \
    2>&1 | sed -n '/batch-1 decode:/,/TTFT GPU/p' | head -30
done
