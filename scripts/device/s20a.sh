#!/usr/bin/env bash
# Next session, run a: the nineteenth session's moves on a GPU (decode_tiles, gemv_folds, the
# fixed SDPA-route test), then the media workload on main (TTFTs after the mixed-step split).
source scripts/device/setup.sh
timeout 240 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py tests/llm_core/test_gemv_gpu.py \
  tests/llm_core/test_moe_gpu.py 2>&1 | tail -4
timeout 120 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_quant_gpu.py \
  -k "fp8_linear or (int4_gemv and bfloat16) or graph_replay" 2>&1 | tail -3
timeout 220 python3 -m polymodal.cli bench --workload media --skip-hf 2>&1 | grep -A12 "^NVIDIA"
