#!/usr/bin/env bash
# Twenty-seventh session, third run: the host's share of fresh large inputs' TTFT, then a long
# video's TTFT against the prefill chunk budget (the second engine now finds the first's memory).
source scripts/device/setup.sh
timeout 200 python3 scripts/device/host_media.py 2>&1 | grep -E "process_tokens|tottime|^ +[0-9]" \
  | cut -c1-160 | head -60
timeout 330 python3 scripts/device/chunk_ab.py 2>&1 | grep -E "budget|Error|error" | tail -8
