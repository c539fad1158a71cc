#!/usr/bin/env bash
# Twenty-ninth session: the server bursts (issue 13: p50 <= 1 s and >= 90% of offline in every
# burst), then issue 19's INT4 one-row GEMV tests and its prefetch sweep (full log under $OUT).
source scripts/device/setup.sh
timeout 200 python3 -m polymodal.cli bench --workload serve --bursts 3 2>&1 | tail -6
timeout 120 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_quant_gpu.py \
  -k "int4_gemv" 2>&1 | tail -2
timeout 260 python3 scripts/bench_quant_kernels.py --only int4_gemv --rows 1 > $OUT/int4_sweep.txt 2>&1
grep -v "^$" $OUT/int4_sweep.txt | head -60 | cut -c1-160
