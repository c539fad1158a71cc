#!/usr/bin/env bash
# Next session, first run: the decode kernel with the q/k head norms folded in (twenty-seventh
# session, written on the CPU): GPU tests, then Qwen3-30B-A3B (issue 17) and Gemma-3-12B decode
# with the norms as two kernels / one / folded.
source scripts/device/setup.sh
timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_triton_kernels_gpu.py \
  tests/llm_core/test_families_gpu.py -k "rope_decode or qwen3 or gemma3" 2>&1 | tail -2
timeout 200 python3 scripts/device/qk_ab.py qwen3-30b-a3b 2>&1 | grep -E "kernel|folded|Error|error" | tail -4
timeout 200 python3 scripts/device/qk_ab.py gemma-3-12b 2>&1 | grep -E "kernel|folded|Error|error" | tail -4
