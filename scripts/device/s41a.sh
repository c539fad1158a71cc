#!/usr/bin/env bash
# Thirty-seventh session (issue 13): a fresh server's first burst against its second, each
# under the engine process's torch profiler (scripts/device/burst_profile.py).
source scripts/device/setup.sh
timeout 560 python3 scripts/device/burst_profile.py 2>&1 | grep -v -i "warn" | tail -90
