#!/usr/bin/env bash
# s31a without the pack launch's A/B (a shorter first run when the device budget is low):
# s31t.sh's GPU tests of the pack launch and of Llama 4's tower, then the reduced Llama 4 bench.
source scripts/device/s31t.sh
timeout 100 python3 -m polymodal.cli bench llama4-scout-reduced --dummy-weights --skip-hf \
  --profile > $OUT/llama4.txt 2>&1
grep -E "ours vs|TTFT ms|decode ms|captioning|floors" $OUT/llama4.txt | cut -c1-220
grep -A14 "TTFT of one" $OUT/llama4.txt | cut -c1-160
