#!/usr/bin/env bash
# Issue 19's INT4 decode: the one-row GEMV with the next tile's loads a tile ahead (PREFETCH) on
# the GPU, its tests, then the sweep at a 7B's shapes (each config with and without prefetch:
# us and GB/s against bf16 cuBLAS).
source scripts/device/setup.sh
timeout 150 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_quant_gpu.py \
  -k "int4_gemv" 2>&1 | tail -2
timeout 400 python3 scripts/bench_quant_kernels.py --only int4_gemv --rows 1 2>&1 \
  | grep -v "^$" | head -100
