#!/usr/bin/env bash
# VL families next to transformers on the device (each ~2-3 minutes):
#   run(command="bash scripts/device/vl.sh gemma-3-12b-it pixtral-12b", carry=[".whl"])
source scripts/device/setup.sh
for model in "$@"; do
  timeout 280 python3 -m polymodal.cli bench "$model" --images 128 --hf-images 16 \
    --json "/tmp/$model.json" > "/tmp/$model.log" 2>&1
  tail -3 "/tmp/$model.log" | cut -c1-300
  python3 -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1])))[:2500])" "/tmp/$model.json"
done
