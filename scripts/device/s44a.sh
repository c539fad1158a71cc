#!/usr/bin/env bash
# The thirty-ninth session's Mllama run (issue 18; no device after its code changes): the bench next to
# transformers, the split and Mllama GPU tests, its TTFT profile.
source scripts/device/setup.sh
timeout 200 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --json $OUT/mllama.json > $OUT/mllama.txt 2>&1
echo "bench rc=$?"; grep -v -i "warn\|regex" $OUT/mllama.txt | tail -7
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_prefill_splits_gpu.py tests/sdk/test_vl_families_gpu.py -k "split or mllama" 2>&1 | tail -3
timeout 90 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --images 32 --profile --json $OUT/mllama_prof.json > $OUT/mllama_prof.txt 2>&1
echo "profile rc=$?"; grep -v -i "warn\|regex" $OUT/mllama_prof.txt | head -32
