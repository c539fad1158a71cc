#!/usr/bin/env bash
# Next session, third run (issue 17): the one-token expert launches' configs with and without
# the next weight tile a tile ahead (`GemvConfig.prefetch`, written on the CPU: 16 x 512 takes
# 80 -> 149 registers with it, so only half-size tiles are swept with it).
source scripts/device/setup.sh
timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_moe_gpu.py 2>&1 | tail -2
timeout 420 python3 scripts/bench_moe.py --only decode --decode-tokens 1 --sweep 2>&1 \
  | grep -E "sweep|qwen3|mixtral" | head -30
