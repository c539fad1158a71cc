#!/usr/bin/env bash
# Twenty-eighth session: the split-KV prefill's merge by its last split, MERGE_UNROLL partials
# in flight: GPU tests, then the kernel bench.
source scripts/device/setup.sh
timeout 60 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_prefill_splits_gpu.py 2>&1 | tail -1
timeout 60 python3 scripts/bench_prefill_splits.py 2>&1 | tail -6
