#!/usr/bin/env bash
# Issues 19 and 17 in ~6 minutes, for a session with little device time: the one-row INT4
# GEMV's default configs with stages 1 / 3 / 5 at the 7B's four shapes (s50b), then
# Qwen3-30B-A3B's expert launches by stages variant at one token (moe_stages.py's first part).
source scripts/device/setup.sh
INT4_WIDE=none timeout 170 python3 scripts/device/int4_stages.py sweep /tmp/best.json \
  gate_up down qkv o 2>&1 | grep -v -i "warn"
timeout 150 python3 scripts/device/moe_stages.py layers 2>&1 | grep -v -i "warn\|regex\|INFO"
