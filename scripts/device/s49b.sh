#!/usr/bin/env bash
# Issue 17, after s49a (one launch 46.5 us a layer vs three 36.6 on an H100: a program an SM
# streams its items one after another): the GPU tests (sums of squares compared per row), then
# configs with more, smaller programs an SM and only the router's programs at the barrier; the
# engine A/B runs only for a config faster than the three launches.
source scripts/device/setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_moe_layer_gpu.py \
  2>&1 | tail -4
timeout 300 python3 scripts/device/moe_layer_ab.py both 2>&1 | grep -v -i "warn\|regex\|INFO"
