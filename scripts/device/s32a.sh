#!/usr/bin/env bash
# Thirty-first session, first run: the GPU tests of the paths not yet run on a GPU (the fresh
# chunk's pack launch, Llama 4's tower; FP8's one row on the 16-bit GEMV: W8A16), the W8A16
# GEMV's config sweep beside the wgmma GEMV (issue 19). Then s32b.sh.
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  -k "fresh_prefill or long_chunked" 2>&1 | tail -4
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/encoders/test_llama4_encoder.py \
  tests/sdk/test_vl_families_gpu.py -k "llama4" 2>&1 | tail -4
timeout 100 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_quant_gpu.py \
  -k "fp8_linear or (graph_replay and fp8) or fp8_greedy" 2>&1 | tail -4
timeout 120 python3 scripts/bench_quant_kernels.py --only fp8_w8a16 > $OUT/w8a16.txt 2>&1
grep -E "^fp8|^\(default|^  " $OUT/w8a16.txt | awk '/^fp8/{n=0} {if (n++ < 5) print}' | cut -c1-120
