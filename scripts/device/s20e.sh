#!/usr/bin/env bash
# Twentieth session, run e: 32-key decode tiles at head dim 256 (`decode_block_n`): Gemma 3's
# GPU parity tests (a head-dim-256 tiny checkpoint among them) and the decode kernel's GPU
# tests, then Gemma-3-12B's batch-1 decode against its floor (issue 16's target: >= 85%).
source scripts/device/setup.sh
timeout 150 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_families_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "gemma3 or decode" 2>&1 | tail -3
timeout 200 python3 scripts/bench_text_decode.py gemma-3-12b --prompts 128 --tokens 128 \
  --json $OUT/gemma.json 2>&1 | grep -E '"(decode|hbm|tokens)' 
