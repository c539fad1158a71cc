#!/usr/bin/env bash
# Thirty-eighth session (issue 18): Mllama's first bench (captioning >= 10x transformers, TTFT
# <= 2x its floor), then its TTFT with the tower attention as one masked SDPA call (the code
# before; AB_MLLAMA through scripts/device/ab), then its GPU tests.
source scripts/device/setup.sh
timeout 300 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --json $OUT/mllama.json > $OUT/mllama.txt 2>&1
echo "bench rc=$?"; grep -v -i "warn\|regex" $OUT/mllama.txt | tail -14
AB_MLLAMA=mask PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH timeout 130 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --images 32 --json $OUT/mllama_mask.json > $OUT/mllama_mask.txt 2>&1
echo "mask rc=$?"; grep -v -i "warn\|regex" $OUT/mllama_mask.txt | tail -8
timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/sdk/test_vl_families_gpu.py -k mllama 2>&1 | tail -2
