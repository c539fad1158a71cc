#!/usr/bin/env bash
# Thirtieth session: vision towers' attention at odd head dims, as is and zero-padded (issue 18).
source scripts/device/setup.sh
timeout 300 python3 scripts/device/sdpa_pad.py 2>&1 | grep -E "^sdpa|Error" | tr '|' '\n'
# where a Gemma 3 TTFT's host time goes (never run on a GPU before)
timeout 240 python3 scripts/device/vl_host_timeline.py gemma-3-12b-it 2>&1 | tail -22
