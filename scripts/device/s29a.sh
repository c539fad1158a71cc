#!/usr/bin/env bash
# Twenty-eighth session, second run: the folded q/k norm GPU tests with time to compile (s28a's
# 150 s cut them off after five), then the server bursts with the server's decoded images copied
# (POLYMODAL_PIXEL_VIEWS=0) and read in place (the default).
source scripts/device/setup.sh
timeout 270 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_triton_kernels_gpu.py \
  tests/llm_core/test_families_gpu.py -k "rope_decode or qwen3 or gemma3" 2>&1 | tail -4
for views in 0 1; do
  POLYMODAL_PIXEL_VIEWS=$views timeout 140 python3 -m polymodal.cli bench --workload serve \
    --bursts 2 2>&1 | tail -4 | sed "s/^/views=$views /"
done
