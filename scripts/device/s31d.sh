#!/usr/bin/env bash
# Thirtieth session (issue 19): where FP8 captioning's time goes next to bf16's (the target is
# 1.4x bf16 images/s with the tower left 16-bit): the engine bench with its phase and kernel
# tables, bf16 then FP8 (whole outputs under $OUT).
source scripts/device/setup.sh
for q in bf16 fp8; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8" || echo "--dummy-weights")
  timeout 270 python3 -m polymodal.cli bench --skip-hf --images 128 $flag --profile \
    > $OUT/engine_$q.txt 2>&1
  echo "== $q"; grep -E "images/s|tok/s|TTFT|caption_phases|vision tower:" $OUT/engine_$q.txt | head -12
  grep -A12 "caption_phases" $OUT/engine_$q.txt | tail -12
done
