#!/usr/bin/env bash
# Issue 16: Gemma 3's one-row folds (the sandwich norms,
# `Linear.fused(post_norm=)` / `gemv_folds.post_norm_tail`; GELU-tanh * up on down's load) and
# the 32-key decode tiles at head dim 256, on the GPU. (1) Gemma 3's GPU parity tests (bf16
# greedy tokens vs transformers with graphs: the folded decode step) and the GEMV / decode
# kernels' GPU tests. (2) Gemma-3-12B batch-1 decode with each fold on / off
# (`gemma_variants.py`). The bench's own figure: s22b.sh.
source scripts/device/setup.sh
timeout 420 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_families_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py tests/llm_core/test_gemv_gpu.py \
  -k "gemma3 or decode or post_norm or gemv" 2>&1 | tail -3
# (gemma_variants.py ran on 2026-12-05: the folds measured slower, now off; docs/performance.md)
