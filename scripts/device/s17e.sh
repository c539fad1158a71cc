#!/usr/bin/env bash
# Seventeenth session, run e (trial: main + repeatfast): split-KV prefill tests and kernel
# bench, the no-recompile tests, then the media workload (first calls, repeats, captioning).
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -m gpu tests/llm_core/test_prefill_splits_gpu.py \
  tests/llm_core/test_no_recompile_gpu.py -q 2>&1 | tail -3
timeout 60 python3 scripts/bench_prefill_splits.py 2>&1 | tail -6
timeout 300 python3 -m polymodal.cli bench --workload media --skip-hf --json $OUT/media.json \
  > $OUT/media.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$\|^[a-z0-9]*: {' $OUT/media.log | tail -30 | cut -c1-150
