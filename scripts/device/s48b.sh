#!/usr/bin/env bash
# Issue 17 (next session's first run; ~8 minutes): the MoE decode routing asking L2 for the
# next layer's qkv weight while its latency chain runs (l2_prefetch.py, off by default). GPU
# tests (the prefetch changes no result; Qwen3-MoE's engine with graphs), then batch-1 decode of
# Qwen3-30B-A3B by prefetch size in MB (0 = off; "last": evict-last lines), alternating.
source scripts/device/setup.sh
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_l2_prefetch.py \
  tests/llm_core/test_families_gpu.py -k "prefetch or qwen3_moe" 2>&1 | tail -3
timeout 420 python3 scripts/device/moe_prefetch_ab.py qwen3-30b-a3b 0 16 0 16 16last 8 24 2>&1 | grep -v -i "warn\|regex"
