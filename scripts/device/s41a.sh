#!/usr/bin/env bash
# Thirty-seventh session (issue 13): a fresh server's first burst against its second
# (scripts/device/burst_profile.py): MODE torch (the engine process's torch profiler), spy
# (py-spy over the server's processes) or spyn (py-spy --native).
source scripts/device/setup.sh
export PATH=/tmp/site/bin:$PATH
timeout 560 python3 scripts/device/burst_profile.py ${1:-spy} 2>&1 | grep -v -i "warn" | tail -110
