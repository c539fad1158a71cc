#!/usr/bin/env bash
# Twenty-eighth session: a repeated 1080p image's host time (scripts/device/repeat_host.py),
# then the media bench with the packed split-KV prefill (its "again" column).
source scripts/device/setup.sh
timeout 200 python3 scripts/device/repeat_host.py 2>&1 | grep -v "^$" | cut -c1-150 | tail -32
timeout 300 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 2>&1 \
  | grep -A8 "^NVIDIA"
