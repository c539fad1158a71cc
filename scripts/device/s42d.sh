#!/usr/bin/env bash
# Thirty-eighth session (issue 18), for the last ~170 s of a budget: Mllama's GPU tests (the
# unmasked tower attention in bf16 on CUDA), then its TTFT against its floor (no transformers).
source scripts/device/setup.sh
timeout 45 python3 -m pytest -q -p no:cacheprovider -m gpu tests/sdk/test_vl_families_gpu.py -k mllama 2>&1 | tail -2
timeout 110 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --images 16 --json $OUT/mllama.json > $OUT/mllama.txt 2>&1
echo "bench rc=$?"; grep -v -i "warn\|regex" $OUT/mllama.txt | tail -12
