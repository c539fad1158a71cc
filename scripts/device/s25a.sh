#!/usr/bin/env bash
# The twenty-fourth session's CPU-tested features on the GPU, tests only: speculative decoding's
# drafters (n-gram, draft model, EAGLE/EAGLE-3, DeepSeek MTP), the host KV tier, load_weights under
# captured graphs, sleep mode, VL / prompt embeddings on CUDA.
source scripts/device/setup.sh
timeout 240 python3 -m pytest -p no:cacheprovider -q -rfE tests/llm_core/test_speculative_gpu.py \
  tests/llm_core/test_kv_offload.py tests/llm_core/test_mtp.py tests/llm_core/test_eagle.py \
  tests/llm_core/test_draft_model.py -m gpu 2>&1 | tail -15
timeout 200 python3 -m pytest -p no:cacheprovider -q -rfE tests/llm_core/test_weight_update.py \
  tests/llm_core/test_sleep.py tests/llm_core/test_vl_embedding.py tests/llm_core/test_prompt_embeds.py \
  tests/sdk/test_image_embeds.py -k "captured or gpu or cuda" 2>&1 | tail -8
timeout 60 python3 scripts/device/kv_tier_copies.py 2>&1 | tail -6  # batched host-tier copies
