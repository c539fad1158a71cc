#!/usr/bin/env bash
# Thirty-ninth session's Mllama TTFT changes one at a time (issue 18), each switched back to
# the code before through scripts/device/ab (alternating, `--skip-hf --images 32`):
# default, AB_MLLAMA=cat (concatenated attention outputs), AB_CROSS_SPLIT=0 (one-pass cross
# prefill), AB_STORE_AHEAD=0 (eager first step), AB_MLLAMA_RESIZE=host (host resize), default.
source scripts/device/setup.sh
for v in none AB_MLLAMA=cat AB_CROSS_SPLIT=0 AB_STORE_AHEAD=0 AB_MLLAMA_RESIZE=host none; do
  env $([ "$v" = none ] || echo "$v") PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH timeout 80 \
    python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --images 32 \
    > $OUT/ab.txt 2>&1
  echo "$v rc=$?: $(grep -E 'TTFT ms|captioning images' $OUT/ab.txt | tr -s ' ' | tr '\n' ' ')"
done
