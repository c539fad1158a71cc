#!/usr/bin/env bash
# One device run of the quantization checks (H200, ~6 minutes):
#   run(command="bash scripts/device/quant.sh", carry=[".whl"])   after scripts/device/wheels.sh
# GPU tests of the INT4 / FP8 kernels and engines, the kernel sweeps, the engine benches.
source scripts/device/setup.sh
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py \
  -k "int4_gemm or dense or fp8_linear or greedy or graph_replay" 2>&1 | tail -4
timeout 90 python3 scripts/bench_quant_kernels.py --only int4_gemv --rows 1 2>&1 | tail -40
timeout 60 python3 scripts/bench_quant_kernels.py --only int4_folds 2>&1 | tail -6
timeout 90 python3 scripts/bench_quant_kernels.py --only fp8_gemv --rows 1 2>&1 | grep -A3 "^fp8_gemv\|FAILED" | head -50
for q in awq fp8; do
  timeout 80 python3 -m polymodal.cli bench --skip-hf --images 128 --quantization $q 2>&1 | tail -8
done
