#!/usr/bin/env bash
# Issue 19: FP8 decode batches (2-64 rows) on the Triton GEMM's narrow tiles vs cuBLAS, in the
# engine (captioning at 128 images), alternating; then the GPU tests of the FP8 linears.
source scripts/device/setup.sh
for v in "one pass" cublas "one pass" cublas; do
  timeout 100 python3 scripts/device/fp8_quant_ab.py "$v" 128 > $OUT/ab.txt 2>&1
  grep -E "^==|tok/s|TTFT ms|images/s|Error" $OUT/ab.txt | cut -c1-160
done
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py -k "fp8" 2>&1 | tail -4
