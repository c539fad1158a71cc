#!/usr/bin/env bash
# Fortieth session (issue 18): which Triton variants compile inside Mllama's captioning steps,
# the current code and AB_STORE_AHEAD=0 (AB_COMPILELOG next to AB_STEPLOG).
source scripts/device/setup.sh
AB="PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH"
for v in none AB_STORE_AHEAD=0; do
  tag=$([ "$v" = none ] && echo new || echo noahead)
  env $AB $([ "$v" = none ] || echo "$v") AB_STEPLOG=$OUT/$tag.steps AB_COMPILELOG=$OUT/$tag.compile timeout 120 \
    python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf > $OUT/$tag.txt 2>&1
  echo "$tag rc=$?: $(grep -E 'captioning images' $OUT/$tag.txt | tr -s ' ')"; grep -i "error\|Trace" $OUT/$tag.txt | head -3
  python3 scripts/device/compiles.py $OUT/$tag | head -40
done
