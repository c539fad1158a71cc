#!/usr/bin/env bash
# Twenty-sixth session, first run: Gemma-3-12B's decode A/B of the three latency changes
# (scripts/device/gemma_s26.py), then the Gemma GPU parity tests with them.
source scripts/device/setup.sh
timeout 450 python3 scripts/device/gemma_s26.py gemma 2>&1 | grep -E "gemma:|Error|error" | tail -7
timeout 100 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_families_gpu.py \
  -k "gemma3 and (bf16_gemv or 4096)" 2>&1 | tail -2
