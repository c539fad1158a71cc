#!/usr/bin/env bash
# One run for a short device budget: issue 16's Gemma-3-12B decode A/B (s25d's first step), then
# the GPU tests of this and the last session's CPU-tested features (speculative drafters incl.
# Medusa and verify shapes, the host KV tier, MTP) and the batched host-tier copies' timing.
source scripts/device/setup.sh
timeout 300 python3 scripts/device/gemma_splits.py 2>&1 | grep -E "split|Error" | tail -6
timeout 170 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_speculative_gpu.py \
  tests/llm_core/test_kv_offload.py tests/llm_core/test_mtp.py -m gpu 2>&1 | tail -4
timeout 45 python3 scripts/device/kv_tier_copies.py 2>&1 | tail -5
