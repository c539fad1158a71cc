#!/usr/bin/env bash
# Thirty-seventh session (issue 18): Mllama (Llama 3.2 11B Vision's shape, random weights)
# through the VL family bench for the first time: TTFT against its floor, decode, captioning
# next to transformers on the same tensors; then its GPU tests.
source scripts/device/setup.sh
timeout 420 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights > $OUT/mllama.txt 2>&1
grep -v -i "warn\|regex" $OUT/mllama.txt | tail -12
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/sdk/test_vl_families_gpu.py -k mllama 2>&1 | tail -2
