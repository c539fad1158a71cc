#!/usr/bin/env bash
# Eighteenth session, run f: mixed steps split (decode rows on the decode kernel): GPU tests,
# then the captioning row A/B against the commit before (unpacked first as an untracked
# folder: `git archive HEAD | tar -x -C abold`).
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/old ./abold \
  2>&1 | grep -v -i warn | tail -1
timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_mixed_step_split_gpu.py \
  tests/sdk/test_gpu_e2e.py 2>&1 | tail -4
timeout 120 python3 scripts/device/caption_ab.py split 192 2>&1 | grep -A12 "^== "
PYTHONPATH=/tmp/old:/tmp/site timeout 120 python3 scripts/device/caption_ab.py before 192 2>&1 | grep -A12 "^== "
