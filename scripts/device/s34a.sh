#!/usr/bin/env bash
# Next session's first run (written in the thirty-second): the decoder GEMMs at one image's
# prompt rows against the roofline (issue 18: Gemma 3's 287-row GEMMs at ~70%: does a swapped
# product or another tile beat cuBLAS's pick?), the FP8 activation quantization A/B at 128
# images twice (issue 19: one pass vs two, 46.4 vs 48.4 images/s at 64 in one run each).
# Then s34b.sh.
source scripts/device/setup.sh
timeout 120 python3 scripts/bench_gemm_rows.py --model gemma-3-12b --rows 287,288 2>&1 | tail -12
timeout 120 python3 scripts/bench_gemm_rows.py --model qwen2.5-vl-7b --rows 290,2725 2>&1 | tail -11
timeout 60 python3 scripts/bench_gemm_rows.py --model pixtral-12b --rows 827 2>&1 | tail -6
for v in "one pass" "two passes" "one pass" "two passes" "bf16"; do
  timeout 100 python3 scripts/device/fp8_quant_ab.py "$v" 128 > $OUT/ab.txt 2>&1
  grep -E "^==|tok/s|TTFT ms|images/s|fraction of floor|Error" $OUT/ab.txt | cut -c1-160
done
