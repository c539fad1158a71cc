#!/usr/bin/env bash
# Sixteenth session, run c: GPU checks of the merged branches (moefix, vlhost, warmfirst,
# int4fast), then the micro-benchmarks that pick their defaults, then Pixtral's TTFT. Logs: $OUT.
source scripts/device/setup.sh
T="python3 -m pytest -q -p no:cacheprovider -m gpu"
timeout 100 $T tests/sdk/test_bench_timing.py tests/llm_core/test_moe_gpu.py \
  tests/processors/test_llava_gpu_staging.py tests/llm_core/test_varlen_sdpa_gpu.py \
  -k "graph_ms or late_down_loads or captures or never_waits or bucketed or new_tower or long_chunked" 2>&1 | tail -3
timeout 100 $T tests/llm_core/test_quant_gpu.py \
  -k "int4_gemv_7b_shapes or int4_greedy or graph_replay or int4_dense_path" 2>&1 | tail -3
timeout 80 python3 scripts/bench_sdpa_shapes.py > $OUT/sdpa_shapes.log 2>&1; tail -22 $OUT/sdpa_shapes.log
timeout 90 python3 scripts/bench_moe.py --only decode --ab > $OUT/moe_ab.log 2>&1; tail -12 $OUT/moe_ab.log
timeout 80 python3 scripts/bench_quant_kernels.py --only int4_gemv --rows 1 > $OUT/int4.log 2>&1
grep -v "^ *$" $OUT/int4.log | grep -i "default\|failed\|error" | head -8; grep -A3 "^gate_up\|^qkv" $OUT/int4.log | head -12
timeout 110 python3 -m polymodal.cli bench pixtral-12b --skip-hf --images 16 --output-tokens 16 \
  --profile --json $OUT/pixtral.json > $OUT/pixtral.log 2>&1
sed -n '/^TTFT of one/,/^{/p' $OUT/pixtral.log | head -14
python3 -c "import json; r=json.load(open('$OUT/pixtral.json')); print({k: r.get(k) for k in ('ttft_floor_ms', 'prompt_tokens')}, r['ours'])"
