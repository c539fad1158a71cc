#!/usr/bin/env bash
# Twenty-ninth session (issue 18): where one fresh image's TTFT goes for the reduced Llama 4 Scout
# and Pixtral-12B (kernel tables under $OUT).
source scripts/device/setup.sh
for m in llama4-scout-reduced pixtral-12b; do
  timeout 190 python3 -m polymodal.cli bench $m --dummy-weights --skip-hf --profile \
    --json $OUT/$m.json > $OUT/$m.txt 2>&1
  echo "== $m rc $?"; grep -v "^\[transformers\]\|^INFO\|Warning" $OUT/$m.txt | tail -40 | cut -c1-150
done
