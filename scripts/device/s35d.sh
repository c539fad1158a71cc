#!/usr/bin/env bash
# Issue 19: the Triton FP8 GEMM's sums promoted to fp32 every 32 features: the parity and
# linear tests, its speed at 32 rows, the engine at 64 images (decode batches of 64) vs cuBLAS.
source scripts/device/setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py -k "fp8" 2>&1 | grep -E "Error:|passed|failed" | head -8
timeout 200 python3 scripts/bench_quant_kernels.py --only fp8_rows --rows 32 2>&1 | tail -5
for v in "one pass" cublas; do
  timeout 100 python3 scripts/device/fp8_quant_ab.py "$v" 64 > $OUT/ab.txt 2>&1
  grep -E "^==|TTFT ms|images/s|Error" $OUT/ab.txt | cut -c1-160
done
