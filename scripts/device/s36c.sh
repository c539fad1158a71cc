#!/usr/bin/env bash
# Next session's third run (written in the thirty-third). Issue 19's INT4 prefill (TTFT 0.76x
# bf16, target 0.8x): from 128 rows the INT4 weight is dequantized whole and multiplied by
# cuBLAS; the Triton INT4 GEMM's sweep now has BLOCK_M 256 tiles (a 290-row prompt's weights
# dequantized twice, not three times): does one beat dequantize + cuBLAS at 290 rows?
source scripts/device/setup.sh
timeout 500 python3 scripts/bench_quant_kernels.py --only int4_gemm --rows 290 > $OUT/int4.txt 2>&1
grep -E "^int4_gemm|^  " $OUT/int4.txt | head -40
