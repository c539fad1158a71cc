#!/usr/bin/env bash
# Twenty-seventh session, fifth run: the host share of fresh large media, Pillow's pixels read
# in place vs copied (fresh inputs in every pass), the TTFTs against their floors, then the
# server bursts (issue 13: its JPEGs are decoded by the server, now read in place).
source scripts/device/setup.sh
timeout 200 python3 scripts/device/host_media.py 2>&1 | grep -E "process_tokens|TTFT" | cut -c1-150
timeout 250 python3 -m polymodal.cli bench --workload serve --bursts 3 2>&1 | tail -12
