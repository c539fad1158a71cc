#!/usr/bin/env bash
# Next session's first run (written in the thirty-third). Issue 19: the Triton FP8 GEMM's
# split-K (fp32 planes added in order) and deeper K tiles on hardware, then the W8A8 forms at
# decode-batch rows: does split-K / BLOCK_K 512 close the down projection's gap (36.9 us at
# 32 rows against 22.6 of weight reads), and does any Triton tile beat cuBLAS at 128-256 rows
# (the 512-image captioning's decode batches)?
source scripts/device/setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py \
  -k "split_k or fp8_linear" 2>&1 | grep -E "Error:|passed|failed" | head -6
timeout 420 python3 scripts/bench_quant_kernels.py --only fp8_rows --rows 32,64,128,256 \
  > $OUT/rows.txt 2>&1; tail -18 $OUT/rows.txt
timeout 150 python3 scripts/bench_quant_kernels.py --only fp8_rows_block --rows 2,32,64 2>&1 | tail -14
