#!/usr/bin/env bash
# Fortieth session (issue 18): Mllama's tower with its residual adds and gates folded into the
# LayerNorm kernels: the bench (transformers measured in s45e), the norm / Mllama GPU tests,
# the TTFT profile.
source scripts/device/setup.sh
timeout 100 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --json $OUT/b.json > $OUT/b.txt 2>&1
echo "bench rc=$?: $(grep -E 'TTFT ms|captioning images|floors' $OUT/b.txt | tr -s ' ' | tr '\n' ' ')"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_layer_norm_gpu.py tests/sdk/test_vl_families_gpu.py -k "norm or mllama" 2>&1 | tail -2
timeout 80 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --images 32 --profile > $OUT/prof.txt 2>&1
echo "profile rc=$?"; grep -v -i "warn\|regex" $OUT/prof.txt | grep -A24 "TTFT of one"
