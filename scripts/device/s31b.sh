#!/usr/bin/env bash
# Thirtieth session, second run: the media bench after the fresh chunk's pack launch (issue 15:
# 4K >= 70%, 1080p repeat <= 8 ms), then the server burst at the serving default's 8192-token
# steps and at 4096 (issue 13: p50 <= 1 s; finer steps put the median first token nearer the
# end of its own prefill).
source scripts/device/setup.sh
timeout 200 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 \
  > $OUT/media.txt 2>&1; grep -A12 "^NVIDIA" $OUT/media.txt | head -14
for budget in 8192 4096; do
  echo "== step budget $budget"
  timeout 170 python3 -m polymodal.cli bench --workload serve --bursts 2 \
    --server-args "--max-num-batched-tokens $budget" 2>&1 | tail -5
done
