#!/usr/bin/env bash
# Fortieth session (issue 18): Mllama's bench with a cold Triton cache (a fresh TRITON_CACHE_DIR:
# what a new machine pays; each compile's key logged), then again on that warm cache.
source scripts/device/setup.sh
AB="PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH"
export TRITON_CACHE_DIR=/tmp/tcache_s45d; rm -rf $TRITON_CACHE_DIR
for tag in cold warm; do
  env $AB AB_STEPLOG=$OUT/$tag.steps AB_COMPILELOG=$OUT/$tag.compile timeout 120 \
    python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf > $OUT/$tag.txt 2>&1
  echo "$tag rc=$?: $(grep -E 'TTFT ms|captioning images' $OUT/$tag.txt | tr -s ' ' | tr '\n' ' ')"
  python3 scripts/device/stalls.py $OUT/$tag.steps | tail -4
done
python3 scripts/device/compiles.py $OUT/cold | cut -c1-200 | head -12
