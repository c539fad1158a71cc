#!/usr/bin/env bash
# Issue 19, s50a cut to ~3 minutes: stages 1 / 3 / 5 of the default config at the 7B's four
# one-row INT4 GEMV shapes (no wide sweep, no engine bench).
source scripts/device/setup.sh
INT4_WIDE=none timeout 200 python3 scripts/device/int4_stages.py sweep /tmp/best.json \
  gate_up down qkv o 2>&1 | grep -v -i "warn"
