#!/usr/bin/env bash
# Nineteenth session, run d: the server burst with the engine process's default 2 media workers
# against 6 (`polymodal serve --media-workers`), one process each, in one run.
source scripts/device/setup.sh
show() { grep -A16 "^NVIDIA" "$1" | cut -c1-200; tail -3 "$1" | grep -i "error\|Trace" ; }
for w in 6 2; do
  timeout 150 python3 -m polymodal.cli bench --workload serve --server-args "--media-workers $w" \
    --json $OUT/serve_w$w.json > $OUT/serve_w$w.log 2>&1
  echo "== media workers $w"; show $OUT/serve_w$w.log
done
