#!/usr/bin/env bash
# Issue 17 (~8 minutes): Qwen3-30B-A3B's expert launches with their K loops pipelined through
# shared memory (`num_stages`), the experts alone by variant (outputs compared with the
# default's), then batch-1 decode with the fastest against the default if one wins by > 3%;
# and with the route launch skipped (the bound of a router fold); then the MoE decode GPU tests.
source scripts/device/setup.sh
timeout 440 python3 scripts/device/moe_stages.py both 2>&1 | grep -v -i "warn\|regex\|INFO"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_moe_layer_gpu.py \
  2>&1 | tail -3
