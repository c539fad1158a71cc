#!/usr/bin/env bash
# Issue 19 in ~2.5 minutes (the least device time worth a start): stages 1 / 3 / 5 of the default
# one-row INT4 GEMV configs at the 7B's two MLP shapes, gate_up and down.
source scripts/device/setup.sh
INT4_WIDE=none timeout 120 python3 scripts/device/int4_stages.py sweep /tmp/best.json \
  gate_up down 2>&1 | grep -v -i "warn"
