#!/usr/bin/env bash
# Issue 19: W8A8's per-token activation quantization read once a row (was ~11 us a launch,
# a fifth of the FP8 prefill GEMMs' time): GPU tests, the kernel A/B, then captioning / TTFT.
source scripts/device/setup.sh
timeout 90 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_quant_gpu.py \
  -k "quantize_rows or (fp8_linear and channel)" 2>&1 | tail -2
timeout 90 python3 scripts/bench_quant_kernels.py --only quantize_rows > $OUT/quant_kernel.txt 2>&1
tail -12 $OUT/quant_kernel.txt
for v in "one pass" "two passes" "bf16"; do
  timeout 80 python3 scripts/device/fp8_quant_ab.py "$v" 64 > $OUT/ab.txt 2>&1
  grep -E "^==|tok/s|TTFT ms|images/s|fraction of floor|Error" $OUT/ab.txt | cut -c1-160
done
