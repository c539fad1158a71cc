#!/usr/bin/env bash
# Thirty-seventh session (issue 13): the server burst with equal tower segments in power-of-2
# SDPA groups (new) or one call (`one`, AB_ONE_GROUP through scripts/device/ab), 2 bursts a
# fresh server; `test` first runs the SDPA route's GPU tests.
source scripts/device/setup.sh
if [ "$1" = test ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_varlen_sdpa_gpu.py 2>&1 | tail -3
  shift
fi
for v in "$@"; do
  [ "$v" = one ] && export AB_ONE_GROUP=1 || unset AB_ONE_GROUP
  echo "== segments grouping: $v"
  PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH timeout 280 python3 -m polymodal.cli bench --workload serve --bursts 2 > $OUT/serve_$v.txt 2>&1
  tail -6 $OUT/serve_$v.txt
done
