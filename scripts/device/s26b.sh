#!/usr/bin/env bash
# Twenty-sixth session, second run: the Gemma GPU parity tests with the changes, where
# Gemma-3-12B's decode step goes beyond its GEMVs (scripts/device/gemma_ablate.py).
source scripts/device/setup.sh
timeout 120 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_families_gpu.py \
  -k "gemma3 and (bf16_gemv or 4096)" 2>&1 | tail -2
timeout 420 python3 scripts/device/gemma_ablate.py 2>&1 | grep -E "kernels|without|Error|error" | tail -8
