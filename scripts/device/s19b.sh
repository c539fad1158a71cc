#!/usr/bin/env bash
# Nineteenth session, run b: main with the mixed-step split: the server burst at the serving
# default (8192 tokens a step) twice, with the TTFT's parts (preprocess, queue, prefill,
# delivery), then the captioning row once more.
source scripts/device/setup.sh
show() { grep -A16 "^NVIDIA" "$1" | cut -c1-200; tail -3 "$1" | grep -i "error\|Trace" ; }
for i in 1 2; do
  timeout 170 python3 -m polymodal.cli bench --workload serve --json $OUT/serve$i.json \
    > $OUT/serve$i.log 2>&1
  echo "== serve $i"; show $OUT/serve$i.log
done
timeout 130 python3 scripts/device/caption_ab.py split 512 2>&1 | grep -A12 "^== "
