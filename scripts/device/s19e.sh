#!/usr/bin/env bash
# Nineteenth session, run e: the prefill attention after its split into prefill_tiles.py and
# prefill_splits.py: its GPU tests (split-KV, head-dim parts, mixed steps, varlen SDPA).
source scripts/device/setup.sh
timeout 170 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_prefill_splits_gpu.py \
  tests/llm_core/test_mixed_step_split_gpu.py tests/llm_core/test_prefill_head_split_gpu.py \
  2>&1 | tail -4
