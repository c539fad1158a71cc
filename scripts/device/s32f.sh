#!/usr/bin/env bash
# Thirty-first session, sixth run (issue 19): FP8's one row on the 16-bit GEMV with the swept
# tiles; the sweep again with larger tiles and the per-row sums; FP8 W8A16 / W8A8 / bf16 decode.
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_quant_gpu.py \
  -k "fp8_linear or (graph_replay and fp8)" 2>&1 | tail -2
timeout 200 python3 scripts/bench_quant_kernels.py --only fp8_w8a16 > $OUT/w8a16.txt 2>&1
grep -E "^fp8|^\(default|^  " $OUT/w8a16.txt | awk '/^fp8/{n=0} {if (n++ < 5) print}' | cut -c1-150
timeout 200 python3 scripts/device/fp8_ab.py > $OUT/fp8_ab.txt 2>&1
grep -E "^==|tok/s|images/s|fraction of floor|Error" $OUT/fp8_ab.txt | cut -c1-160 | head -24
# issue 18: Gemma 3's TTFT floor with SigLIP's fused fc1 + GELU GEMM counted
timeout 120 python3 -m polymodal.cli bench gemma-3-12b-it --dummy-weights --skip-hf --images 16 \
  > $OUT/gemma.txt 2>&1; grep -E "TTFT ms|floors|Error" $OUT/gemma.txt | cut -c1-300
