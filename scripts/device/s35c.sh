#!/usr/bin/env bash
# Issue 19: why the FP8 greedy parity test fails with decode batches on the Triton narrow
# tiles; the W8A8 forms at 128 / 256 rows (the 128-image captioning's decode batches).
source scripts/device/setup.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py -k "greedy_parity_with_the_cpu" 2>&1 | grep -E "Error|error|assert|passed|failed" | head -12
timeout 400 python3 scripts/bench_quant_kernels.py --only fp8_rows --rows 128,256 2>&1 | tail -10
