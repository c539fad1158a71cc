#!/usr/bin/env bash
# Eighteenth session, run d: the server burst at the server's default step budget (8192 on an
# H200), main and servetrial (main + branch servettft, rebased; artifacts/trialsrc carried)
# alternating, two each (one run's spread between processes is ~+-10% in requests/s).
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/trial \
  ./artifacts/trialsrc 2>&1 | grep -v -i warn | tail -1
serve() { timeout 150 python3 -m polymodal.cli bench --workload serve --json $OUT/$1.json \
  > $OUT/$1.log 2>&1; echo "== $1"; grep -A11 "^requests/s" $OUT/$1.log | cut -c1-120; }
for n in 1 2; do
  serve main$n
  PYTHONPATH=/tmp/trial:/tmp/site serve trial$n
done
