#!/usr/bin/env bash
# Next session's third run (written in the thirty-second): kernel tables of FP8 and bf16
# captioning (issue 19: FP8 captioning 1.12-1.17x bf16 against 1.4x), the media repeats
# (issue 15: 64 frames again 67.8 ms vs 33.9 the session before, 1080p 10.4 vs <= 8).
source scripts/device/setup.sh
for q in "--quantization fp8" "--dummy-weights"; do  # where FP8 captioning's time goes
  timeout 170 python3 -m polymodal.cli bench --skip-hf --images 64 --profile $q > $OUT/prof.txt 2>&1
  echo "== $q"; grep -A26 "^captioning 32 images" $OUT/prof.txt | cut -c1-150
done
timeout 150 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 \
  > $OUT/media.txt 2>&1; grep -A8 "^NVIDIA" $OUT/media.txt | head -9
