#!/usr/bin/env bash
# Thirty-first session, third run (issue 18): the VL families' TTFT against the per-phase floor
# at the measured matrix rate (Llama 4 after its tower rework, Gemma 3, Pixtral).
source scripts/device/setup.sh
for m in llama4-scout-reduced gemma-3-12b-it pixtral-12b; do
  timeout 180 python3 -m polymodal.cli bench $m --dummy-weights --skip-hf --images 32 > $OUT/$m.txt 2>&1
  echo "== $m"; grep -E "TTFT ms|floors|captioning|decode ms|Error" $OUT/$m.txt | cut -c1-300
done
