#!/usr/bin/env bash
# Twenty-eighth session: split-KV prefill packed by kv head (a repeat's text tail, a verify
# step, a chat turn over a long cache): GPU tests, then the kernel bench (one pass / unpacked
# split / packed split at SPLIT_MIN_TILES 8, 4, 2).
source scripts/device/setup.sh
timeout 200 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_prefill_splits_gpu.py 2>&1 | tail -3
timeout 300 python3 scripts/bench_prefill_splits.py 2>&1 | tail -9
