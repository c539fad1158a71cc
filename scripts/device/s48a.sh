#!/usr/bin/env bash
# Forty-first session's first run (issue 18): the norm / Mllama GPU tests with the gated sum's
# rounding fix (4145de8), Mllama's bench (--skip-hf: transformers measured in s45e), then the
# default Qwen2.5-VL-7B bench: its bf16 decode (206 tokens/s on an H100 before) should not move
# with the attention kernels' metadata alignment hints gone (ee8ef75).
source scripts/device/setup.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_layer_norm_gpu.py tests/sdk/test_vl_families_gpu.py -k "norm or mllama" 2>&1 | tail -3
timeout 100 python3 -m polymodal.cli bench llama-3.2-11b-vision --dummy-weights --skip-hf --json $OUT/b.json > $OUT/b.txt 2>&1
echo "bench rc=$?: $(grep -E 'TTFT ms|captioning images|decode ms|floors' $OUT/b.txt | tr -s ' ' | tr '\n' ' ')"
timeout 150 python3 -m polymodal.cli bench --dummy-weights --skip-hf --images 128 > $OUT/qwen.txt 2>&1
echo "qwen rc=$?"; grep -v -i "warn\|regex" $OUT/qwen.txt | tail -8
