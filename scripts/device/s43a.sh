#!/usr/bin/env bash
# Thirty-ninth session (issue 18): Mllama's TTFT after the tower's parts-wise residual (no
# concatenation) and the split cross prefill: GPU tests (split launches, Mllama, Whisper), the
# bench next to transformers, then its TTFT profile.
source scripts/device/setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_prefill_splits_gpu.py tests/llm_core/test_whisper.py tests/sdk/test_vl_families_gpu.py -k "split or mllama or whisper or Whisper" 2>&1 | tail -3
timeout 300 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --json $OUT/mllama.json > $OUT/mllama.txt 2>&1
echo "bench rc=$?"; grep -v -i "warn\|regex" $OUT/mllama.txt | tail -7
timeout 120 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --images 32 --profile --json $OUT/mllama_prof.json > $OUT/mllama_prof.txt 2>&1
echo "profile rc=$?"; grep -v -i "warn\|regex" $OUT/mllama_prof.txt | head -32
