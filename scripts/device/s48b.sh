#!/usr/bin/env bash
# Issue 17: the MoE decode routing asks L2 for the next layer's qkv weight while its latency
# chain runs (l2_prefetch.py). GPU tests (the prefetch changes no result; Qwen3-MoE's engine
# with graphs), then batch-1 decode of Qwen3-30B-A3B without / with the prefetch, alternating.
source scripts/device/setup.sh
timeout 50 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_l2_prefetch.py \
  2>&1 | tail -3
timeout 200 python3 scripts/device/moe_prefetch_ab.py qwen3-30b-a3b 0 16 0 2>&1 | grep -v -i "warn\|regex"
