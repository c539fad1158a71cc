#!/usr/bin/env bash
# Thirty-sixth session's first run (few device minutes were lent): the GPU staging tests with
# the frames viewing the caller's PIL memory (correctness of what landed in the thirty-fifth),
# then the media bench beside transformers (issue 15: the 1080p repeat and the 4x column).
source scripts/device/setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/processors/test_llava_gpu_staging.py \
  tests/processors/test_gpu_resize.py 2>&1 | tail -3
timeout 380 python3 -m polymodal.cli bench --workload media --images 16 --json $OUT/media.json \
  > $OUT/media.txt 2>&1
grep -B2 -A10 "^NVIDIA" $OUT/media.txt | head -16; grep -E "Error|error" $OUT/media.txt | head -5
