#!/usr/bin/env bash
# After s22a.sh: (0) load_weights under CUDA graphs; (1) issue 16's figure, Gemma-3-12B batch-1 decode against its floor (>= 85%)
# through the bench. (2) Issue 13: the serve bench's GPU test with two bursts, then
# `--workload serve --bursts 3`: is the first burst's shortfall (cuDNN plans / tower graphs of
# new batch compositions) gone in the second and third?
source scripts/device/setup.sh
timeout 120 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_weight_update.py \
  -k captured 2>&1 | tail -2  # LLM.load_weights under captured graphs (new, CPU-tested)
timeout 120 python3 scripts/bench_text_decode.py gemma-3-12b --prompts 128 --tokens 128 \
  --json $OUT/gemma.json 2>&1 | grep -E '"(decode|hbm|tokens)'
timeout 200 python3 -m pytest -p no:cacheprovider -q tests/sdk/test_bench_gpu.py -k "serve" 2>&1 | tail -2
timeout 240 python3 -m polymodal.cli bench --workload serve --bursts 3 --json $OUT/serve3.json \
  > $OUT/serve3.log 2>&1
grep -A24 "^NVIDIA" $OUT/serve3.log | cut -c1-200; tail -3 $OUT/serve3.log | grep -i "error\|Trace"
