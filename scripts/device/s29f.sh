#!/usr/bin/env bash
# Next session, first run: the split-KV prefill's merge by its last split with MERGE_UNROLL
# partials in flight (written after the twenty-eighth session's device budget was spent): GPU
# tests, the kernel bench (compare its packed column with docs/performance.md's "merge launch"
# column; if slower, the merge launch comes back), then the media bench's repeats.
source scripts/device/setup.sh
timeout 200 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_prefill_splits_gpu.py \
  tests/llm_core/test_speculative_gpu.py 2>&1 | tail -3
timeout 120 python3 scripts/bench_prefill_splits.py 2>&1 | tail -8
timeout 200 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 2>&1 \
  | grep -A7 "^NVIDIA"
