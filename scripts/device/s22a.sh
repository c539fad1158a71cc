#!/usr/bin/env bash
# The next GPU session's first run (issue 16): the sandwich-norm fold (`Linear.fused(post_norm=)`,
# `gemv_folds.post_norm_tail`) and the 32-key decode tiles at head dim 256, on the GPU.
# (1) Gemma 3's GPU parity tests (bf16 greedy tokens vs transformers with graphs: the folded
# decode step) and the GEMV / decode kernels' GPU tests. (2) Gemma-3-12B batch-1 decode folded
# vs unfolded, alternating (`gemma_variants.py`); (3) the bench's figure against its floor.
source scripts/device/setup.sh
timeout 300 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_families_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py tests/llm_core/test_gemv_gpu.py \
  -k "gemma3 or decode or post_norm or gemv" 2>&1 | tail -3
timeout 200 python3 scripts/device/gemma_variants.py 2>&1 | grep -v Warn | tail -5
timeout 150 python3 scripts/bench_text_decode.py gemma-3-12b --prompts 128 --tokens 128 \
  --json $OUT/gemma.json 2>&1 | grep -E '"(decode|hbm|tokens)'
