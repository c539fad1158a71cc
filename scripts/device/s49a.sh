#!/usr/bin/env bash
# Issue 17 (~9 minutes): the MoE decode block as one persistent launch (`moe_layer`). Its GPU
# tests (many resident programs, CUDA graphs, DeepSeek's router + shared expert), Qwen3-MoE's
# family test with the engine on it (greedy tokens vs transformers), then the timings: the block
# alone by config (8 layers of distinct weights in a graph), then batch-1 decode of
# Qwen3-30B-A3B, three launches vs one, alternating.
source scripts/device/setup.sh
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_moe_layer_gpu.py \
  -x 2>&1 | tail -15
AB_MOE_LAUNCH=one PYTHONPATH=scripts/device/ab:$PYTHONPATH timeout 120 python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/llm_core/test_families_gpu.py -k qwen3_moe 2>&1 | tail -3
timeout 150 python3 scripts/device/moe_layer_ab.py layers 2>&1 | grep -v -i "warn\|regex"
timeout 200 python3 scripts/device/moe_layer_ab.py engine three default three default 2>&1 \
  | grep -v -i "warn\|regex\|INFO"
