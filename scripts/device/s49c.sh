#!/usr/bin/env bash
# Issue 17, s49b cut to the device time left (~4 minutes): one-launch configs with more, smaller
# programs an SM and only the router's programs at the barrier; the engine A/B runs only for a
# config faster than the three launches.
source scripts/device/setup.sh
timeout 280 python3 scripts/device/moe_layer_ab.py both w4x3 w4x5 w2x8 w2x6 2>&1 \
  | grep -v -i "warn\|regex\|INFO"
