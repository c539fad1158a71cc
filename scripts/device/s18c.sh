#!/usr/bin/env bash
# Eighteenth session, run c (main): the media workload (TTFT and repeats from 448 px to 64
# frames; PIL images and frame lists now keyed by their pixels read in place; the captioning
# row with its idle-gap attribution), then the server burst at the server's new default step
# budget (8192 tokens on an H200).
source scripts/device/setup.sh
timeout 330 python3 -m polymodal.cli bench --workload media --skip-hf --json $OUT/media.json \
  > $OUT/media.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$\|^[a-z0-9]*: {\|Processed prompts\|tokenizer you are' $OUT/media.log \
  | tail -60 | cut -c1-170
timeout 180 python3 -m polymodal.cli bench --workload serve --json $OUT/serve.json \
  > $OUT/serve.log 2>&1
grep -A12 "^NVIDIA" $OUT/serve.log | cut -c1-160
