#!/usr/bin/env bash
# Thirty-eighth session: Mllama's first bench (issue 18: captioning >= 10x transformers, TTFT
# <= 2x its floor) and its GPU tests, then the tower segment rule's GPU tests (issue 13:
# `triton_backend.segment_groups`, never run on a GPU in its final form).
source scripts/device/setup.sh
timeout 400 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --json $OUT/mllama.json > $OUT/mllama.txt 2>&1
echo "bench rc=$?"; grep -v -i "warn\|regex" $OUT/mllama.txt | tail -14
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/sdk/test_vl_families_gpu.py -k mllama 2>&1 | tail -2
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_varlen_sdpa_gpu.py 2>&1 | tail -3
