#!/usr/bin/env bash
# Seventeenth session, run g (trial: main + captiongap + splitkv): the route-once-a-step and
# split-KV GPU tests, the split bench with the graph-sized short-context row.
source scripts/device/setup.sh
timeout 90 python3 -m pytest -p no:cacheprovider -m gpu tests/llm_core/test_prefill_splits_gpu.py \
  tests/llm_core/test_varlen_sdpa_gpu.py -q 2>&1 | tail -4
timeout 45 python3 scripts/bench_prefill_splits.py 2>&1 | tail -7
