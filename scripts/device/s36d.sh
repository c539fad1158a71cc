#!/usr/bin/env bash
# Issue 18 (Gemma 3 TTFT 2.02-2.03x its floor, ~0.4 ms short of 2x): where a fresh-image
# TTFT's host time goes on the device host, no profiler (`vl_host_timeline.py`: median us
# between the engine's method boundaries over 12 calls), then the bench's TTFT in the same
# machine for the figure it sums to.
source scripts/device/setup.sh
timeout 200 python3 scripts/device/vl_host_timeline.py gemma-3-12b-it > $OUT/timeline.txt 2>&1
grep -vE "Warning|warn" $OUT/timeline.txt | tail -30
timeout 150 python3 scripts/device/gemm_swap_ab.py linear > $OUT/bench.txt 2>&1
grep -E "^==|TTFT ms|floors|Error" $OUT/bench.txt | cut -c1-200
