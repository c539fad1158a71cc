#!/usr/bin/env bash
# Fortieth session (issue 18): Mllama captioning (256 images) fell from 15.85 to 13.43 images/s
# between s42a and s44a; each step of it logged (AB_STEPLOG), the current code and all four of
# the thirty-ninth session's changes switched back together.
source scripts/device/setup.sh
OLD="AB_MLLAMA=cat AB_CROSS_SPLIT=0 AB_STORE_AHEAD=0 AB_MLLAMA_RESIZE=host"
for v in none "$OLD"; do
  tag=$([ "$v" = none ] && echo new || echo old)
  env $([ "$v" = none ] || echo "$v") AB_STEPLOG=$OUT/steps_$tag PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH timeout 120 \
    python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf > $OUT/cap_$tag.txt 2>&1
  echo "$tag rc=$?: $(grep -E 'TTFT ms|captioning images' $OUT/cap_$tag.txt | tr -s ' ' | tr '\n' ' ')"
  python3 scripts/device/steplog.py $OUT/steps_$tag 256 | head -45
done
