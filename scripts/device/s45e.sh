#!/usr/bin/env bash
# Fortieth session (issue 18), after the metadata-alignment and cross warm-up fix: Mllama's bench
# next to transformers on a cold Triton cache (a new machine), again on the warm cache, the
# steps' stalls and compiles; then the kernels' and Mllama's / Whisper's GPU tests.
source scripts/device/setup.sh
AB="PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH"
export TRITON_CACHE_DIR=/tmp/tcache_s45e; rm -rf $TRITON_CACHE_DIR
env $AB AB_STEPLOG=$OUT/cold.steps AB_COMPILELOG=$OUT/cold.compile timeout 230 \
  python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --json $OUT/cold.json > $OUT/cold.txt 2>&1
echo "cold rc=$?"; grep -v -i "warn\|regex\|forward_call" $OUT/cold.txt | tail -6
python3 scripts/device/stalls.py $OUT/cold.steps | tail -4
python3 scripts/device/compiles.py $OUT/cold | cut -c1-160 | head -8
env $AB AB_STEPLOG=$OUT/warm.steps timeout 120 \
  python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf > $OUT/warm.txt 2>&1
echo "warm rc=$?: $(grep -E 'TTFT ms|captioning images' $OUT/warm.txt | tr -s ' ' | tr '\n' ' ')"
python3 scripts/device/stalls.py $OUT/warm.steps | tail -3
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_triton_kernels_gpu.py \
  tests/llm_core/test_prefill_splits_gpu.py tests/sdk/test_vl_families_gpu.py tests/llm_core/test_whisper.py \
  -k "split or mllama or whisper or Whisper or decode or prefill or cross" 2>&1 | tail -3
