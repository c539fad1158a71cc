#!/usr/bin/env bash
# Issue 16's Gemma-3-12B batch-1 decode (>= 85% of the floor): decode attention splits of one
# 32-key tile at head dim 256 (`triton_backend.split_keys`) against 64 keys a split, A/B in one
# process; then Gemma 3's GPU parity tests and the decode kernel's.
source scripts/device/setup.sh
timeout 330 python3 scripts/device/gemma_splits.py 2>&1 | grep -E "split|Error" | tail -6
timeout 240 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_families_gpu.py \
  tests/llm_core/test_triton_kernels_gpu.py -k "gemma3 or decode" 2>&1 | tail -3
