#!/usr/bin/env bash
# Thirty-eighth session (issue 13): the tower segment rule's GPU tests
# (`triton_backend.segment_groups` in its final form), then two bursts of a fresh server with
# the engine's steps logged (AB_STEPLOG through scripts/device/ab; scripts/device/steplog.py:
# what the engine ran from each burst's first arrival until 128 prompts were done).
source scripts/device/setup.sh
timeout 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_varlen_sdpa_gpu.py 2>&1 | tail -3
AB_STEPLOG=$OUT/steps PYTHONPATH=$PWD/scripts/device/ab:$PYTHONPATH timeout 400 python3 -m polymodal.cli bench --workload serve --bursts 2 > $OUT/serve.txt 2>&1
tail -8 $OUT/serve.txt
python3 scripts/device/steplog.py $OUT/steps | cut -c1-120 | head -70
