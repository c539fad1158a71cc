#!/usr/bin/env bash
# Twenty-sixth session, second run: the kernels' GPU tests, where Gemma-3-12B's decode step goes
# beyond its GEMVs (scripts/device/gemma_ablate.py), the 7B's decode with the merge on and off.
source scripts/device/setup.sh
timeout 80 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "decode or sandwich" 2>&1 | tail -2
timeout 330 python3 scripts/device/gemma_ablate.py 2>&1 | grep -E "kernels|without|Error|error" | tail -8
timeout 160 python3 scripts/device/gemma_s26.py qwen 2>&1 | grep -E "qwen 7b:|Error|error" | tail -4
