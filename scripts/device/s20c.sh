#!/usr/bin/env bash
# Twentieth session, run c: Gemma-3-12B's text decoder (issue 16's decode target, >= 85% of the
# floor; 83% when last run, before the GEMVs' pre-wait tiles) with its kernel table.
source scripts/device/setup.sh
timeout 300 python3 scripts/bench_text_decode.py gemma-3-12b --prompts 16 --tokens 16 --profile \
  --json $OUT/gemma.json 2>&1 | grep -v "^\s*$" | tail -45
