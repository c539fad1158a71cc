#!/usr/bin/env bash
# Twentieth session, run b: the server burst with media loaded in 4 worker processes of the
# engine process (`polymodal serve --media-processes 4`, the auto count on 16 CPUs) against
# none (0: the engine process's threads do it all, as before), alternating, two each.
source scripts/device/setup.sh
show() { grep -A16 "^NVIDIA" "$1" | cut -c1-200; tail -3 "$1" | grep -i "error\|Trace" ; }
for p in 4 0 4 0; do
  timeout 140 python3 -m polymodal.cli bench --workload serve --server-args "--media-processes $p" \
    --json $OUT/serve_p$p.$RANDOM.json > $OUT/serve_p$p.log 2>&1
  echo "== media processes $p"; show $OUT/serve_p$p.log
done
