#!/usr/bin/env bash
# Issue 19 (~6 minutes): the one-row INT4 GEMV's K loop pipelined through shared memory
# (`stages`), swept at the 7B's four shapes against the default (~3 min), then the AWQ engine
# bench with each shape's best config against the defaults (~1.5 min each).
source scripts/device/setup.sh
timeout 170 python3 scripts/device/int4_stages.py sweep /tmp/best.json gate_up down qkv o 2>&1 \
  | grep -v -i "warn"
for v in /tmp/best.json default; do
  [ -f "$v" ] || [ "$v" = default ] || continue
  timeout 90 python3 scripts/device/int4_stages.py engine $v 2>&1 \
    | grep -i "== engine\|decode\|tokens/s\|ttft"
done
