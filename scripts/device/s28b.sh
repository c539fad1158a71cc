#!/usr/bin/env bash
# Next session, second run (issue 13 / 15): the server bursts with the server's decoded images
# copied (POLYMODAL_PIXEL_VIEWS=0) and read in place (the default), then the media bench with
# transformers beside it (the 4x targets).
source scripts/device/setup.sh
for views in 0 1; do
  POLYMODAL_PIXEL_VIEWS=$views timeout 150 python3 -m polymodal.cli bench --workload serve \
    --bursts 2 2>&1 | tail -4 | sed "s/^/views=$views /"
done
timeout 280 python3 -m polymodal.cli bench --workload media --images 16 2>&1 | grep -v ": {" | tail -12
