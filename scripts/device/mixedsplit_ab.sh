#!/usr/bin/env bash
# Branch mixedsplit (this checkout) against main on one H200: the split's GPU tests (incl. no
# Triton variant compiled by mixed steps of any decode-row count), then the media workload's
# captioning row (512 1080p images x 128 tokens) on each. Unpack main first as an untracked
# folder: `git archive main | tar -x -C abold`. The server burst: a second run, `polymodal
# bench --workload serve` with each install.
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/old ./abold \
  2>&1 | grep -v -i warn | tail -1
timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_mixed_step_split_gpu.py \
  tests/llm_core/test_no_recompile_gpu.py tests/llm_core/test_varlen_sdpa_gpu.py 2>&1 | tail -4
timeout 200 python3 scripts/device/caption_ab.py split 512 2>&1 | grep -A12 "^== "
PYTHONPATH=/tmp/old:/tmp/site timeout 200 python3 scripts/device/caption_ab.py main 512 2>&1 \
  | grep -A12 "^== "
