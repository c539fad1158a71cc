#!/usr/bin/env bash
# Thirty-eighth session (issue 18), for a short budget: Mllama's GPU tests (the unmasked tower
# attention in bf16 on CUDA), then its first bench at reduced counts (captioning 96 images,
# transformers 8 at batch 8; TTFT against its floor).
source scripts/device/setup.sh
timeout 50 python3 -m pytest -q -p no:cacheprovider -m gpu tests/sdk/test_vl_families_gpu.py -k mllama 2>&1 | tail -2
timeout 200 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --images 96 --hf-images 8 --hf-batch 8 --json $OUT/mllama.json > $OUT/mllama.txt 2>&1
echo "bench rc=$?"; grep -v -i "warn\|regex" $OUT/mllama.txt | tail -14
