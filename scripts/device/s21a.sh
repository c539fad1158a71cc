#!/usr/bin/env bash
# Next session, run a: the twentieth session's unverified GPU paths, then the serve burst on a
# warm server. (1) 32-key decode tiles at head dim 256: Gemma 3's GPU parity tests (a
# head-dim-256 tiny checkpoint among them) and the decode kernel's GPU tests; the serve bench's
# GPU test with two bursts. (2) `--workload serve --bursts 3`: is the first burst's shortfall
# (cuDNN plans / tower graphs of new batch compositions) gone in the second and third?
source scripts/device/setup.sh
timeout 280 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_families_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "gemma3 or decode" 2>&1 | tail -3
timeout 200 python3 -m pytest -p no:cacheprovider -q tests/sdk/test_bench_gpu.py -k "serve" 2>&1 | tail -2
timeout 300 python3 -m polymodal.cli bench --workload serve --bursts 3 --json $OUT/serve3.json \
  > $OUT/serve3.log 2>&1
grep -A24 "^NVIDIA" $OUT/serve3.log | cut -c1-200; tail -3 $OUT/serve3.log | grep -i "error\|Trace"
