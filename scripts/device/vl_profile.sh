#!/usr/bin/env bash
# The TTFT kernel profile of each named VL family (ours only; ~1.5 minutes each):
#   run(command="bash scripts/device/vl_profile.sh pixtral-12b gemma-3-12b-it", carry=[".whl"])
source scripts/device/setup.sh
for model in "$@"; do
  timeout 200 python3 -m polymodal.cli bench "$model" --skip-hf --images 16 --output-tokens 16 \
    --profile --json "/tmp/$model.json" > "/tmp/$model.log" 2>&1
  sed -n '/^TTFT of one/,/^{/p' "/tmp/$model.log" | head -30
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('ttft_floor_ms', 'ttft_tflop', 'prompt_tokens', 'decode_floor_ms')}, r['ours'])" "/tmp/$model.json"
done
