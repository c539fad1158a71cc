#!/usr/bin/env bash
# Twenty-eighth session: the split-KV prefill merged by its last split (one launch, arrival
# counters) and packed by kv head: GPU tests (splits, graphs, speculative verify steps), the
# kernel bench, then the media bench's repeats.
source scripts/device/setup.sh
timeout 240 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_prefill_splits_gpu.py \
  tests/llm_core/test_no_recompile_gpu.py tests/llm_core/test_speculative_gpu.py 2>&1 | tail -4
timeout 120 python3 scripts/bench_prefill_splits.py 2>&1 | tail -8
timeout 150 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 2>&1 \
  | grep -A7 "^NVIDIA"
