#!/usr/bin/env bash
# Thirty-sixth session (issue 13): the server burst at the serving default (8192-token steps),
# three bursts in one server process, on the current tree (the processors' in-place reads).
source scripts/device/setup.sh
timeout 200 python3 -m polymodal.cli bench --workload serve --bursts 3 > $OUT/serve.txt 2>&1
tail -8 $OUT/serve.txt
