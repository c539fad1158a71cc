#!/usr/bin/env bash
# Twenty-sixth session, second run: where Gemma-3-12B's decode step goes beyond its GEMVs
# (scripts/device/gemma_ablate.py), then the 7B's decode with the merge change on and off.
source scripts/device/setup.sh
timeout 420 python3 scripts/device/gemma_ablate.py 2>&1 | grep -E "kernels|without|Error|error" | tail -8
timeout 160 python3 scripts/device/gemma_s26.py qwen 2>&1 | grep -E "qwen 7b:|Error|error" | tail -4
