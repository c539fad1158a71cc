#!/usr/bin/env bash
# Next session's first run (written in the thirty-fifth), best on an H200. The GPU staging
# tests with every MediaProcessor family's frames now viewing the caller's PIL memory (f62486b:
# an RGBX view uploaded by `copy_to` and sliced on the device); then Gemma-3-12B-it's TTFT
# against its floor, three times (issue 18: 2.00x median on one H100, 2.04-2.12x on another),
# (the media bench moved to s39e.sh).
source scripts/device/setup.sh
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/processors/test_llava_gpu_staging.py \
  tests/processors/test_gpu_resize.py 2>&1 | tail -3
for i in 1 2; do
  timeout 100 python3 scripts/device/gemm_swap_ab.py linear > $OUT/bench.txt 2>&1
  grep -E "TTFT ms|floors|Error" $OUT/bench.txt | cut -c1-200
done
# the third with the kernel table of one fresh image's TTFT (where the decoder's ~6 ms above
# its floor goes: norms, attention, the GEMMs at the ridge)
timeout 130 python3 -m polymodal.cli bench gemma-3-12b-it --dummy-weights --skip-hf --images 32 \
  --profile > $OUT/gemma_prof.txt 2>&1
grep -E "TTFT ms|floors|Error" $OUT/gemma_prof.txt | cut -c1-200
grep -A40 "^TTFT of one fresh image" $OUT/gemma_prof.txt | cut -c1-150
