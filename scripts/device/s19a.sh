#!/usr/bin/env bash
# Nineteenth session, run a: branch mixedsplit (unpacked as artifacts/trialsrc and carried) against
# main: the branch's GPU tests (mixed steps compile no new variant), main's LoRA GPU test (the
# shared B-tile helper), then the captioning row A/B/A/B (512 1080p images x 128 tokens each).
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/trial \
  ./artifacts/trialsrc 2>&1 | grep -v -i warn | tail -1
(cd artifacts/trialsrc && PYTHONPATH=/tmp/trial:/tmp/site timeout 150 python3 -m pytest \
  -p no:cacheprovider -q -m gpu tests/llm_core/test_mixed_step_split_gpu.py \
  tests/llm_core/test_no_recompile_gpu.py 2>&1 | tail -4)
timeout 90 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_lora_gpu.py 2>&1 | tail -3
for label in split main split main; do
  if [ $label = split ]; then pp=/tmp/trial:/tmp/site; else pp=/tmp/site; fi
  PYTHONPATH=$pp timeout 130 python3 scripts/device/caption_ab.py $label 512 2>&1 | grep -A12 "^== "
done
