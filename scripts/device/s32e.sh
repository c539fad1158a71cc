#!/usr/bin/env bash
# Thirty-first session, fifth run (issue 13): the server burst at the serving default's
# 8192-token steps and at 4096 (p50 <= 1 s: finer steps put the median first token nearer the
# end of its own prefill).
source scripts/device/setup.sh
for budget in 8192 4096; do
  echo "== step budget $budget"
  timeout 170 python3 -m polymodal.cli bench --workload serve --bursts 2 \
    --server-args "--max-num-batched-tokens $budget" > $OUT/serve_$budget.txt 2>&1
  tail -6 $OUT/serve_$budget.txt
done
