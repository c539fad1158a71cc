#!/usr/bin/env bash
# Next session's first run (written in the thirty-second; then s34b.sh, s34c.sh). Issue 18:
# the decoder GEMMs at one image's prompt rows against the roofline (Gemma 3's 287-row GEMMs
# at ~70%: does the swapped product or another tile beat cuBLAS's pick?), then Gemma 3's TTFT
# with the swapped product at 129-1024 rows against F.linear, alternating.
source scripts/device/setup.sh
timeout 100 python3 scripts/bench_gemm_rows.py --model gemma-3-12b --rows 287,288 2>&1 | tail -12
timeout 80 python3 scripts/bench_gemm_rows.py --model qwen2.5-vl-7b --rows 290 2>&1 | tail -6
for v in linear swapped linear swapped; do
  timeout 100 python3 scripts/device/gemm_swap_ab.py $v > $OUT/swap.txt 2>&1
  grep -E "^==|TTFT ms|captioning|floors|Error" $OUT/swap.txt | cut -c1-200
done
