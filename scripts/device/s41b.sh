#!/usr/bin/env bash
# Thirty-seventh session (issue 13): the server burst with a step's equal tower segments as
# `triton_backend.segment_groups` splits them (`new`), as one SDPA call (`one`, the code before)
# or as pure power-of-2 pieces (`pow2`), switched by AB_SEGMENTS through scripts/device/ab;
# 2 bursts a fresh server each. `test` first runs the SDPA route's GPU tests.
source scripts/device/setup.sh
if [ "$1" = test ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_varlen_sdpa_gpu.py 2>&1 | tail -3
  shift
fi
for v in "$@"; do
  echo "== segments: $v"
  AB_SEGMENTS=$v PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH timeout 280 python3 -m polymodal.cli bench --workload serve --bursts 2 > $OUT/serve_$v.txt 2>&1
  tail -6 $OUT/serve_$v.txt
done
