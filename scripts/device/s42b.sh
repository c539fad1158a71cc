#!/usr/bin/env bash
# Thirty-eighth session (issue 13): the tower segment rule's GPU tests
# (`triton_backend.segment_groups` in its final form), then the server's first bursts.
source scripts/device/setup.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_varlen_sdpa_gpu.py 2>&1 | tail -3
timeout 400 python3 -m polymodal.cli bench --workload serve --bursts 2 > $OUT/serve.txt 2>&1
tail -8 $OUT/serve.txt
