#!/usr/bin/env bash
# Thirty-fifth session's second run. Issue 15: the media bench on this card (the 1080p repeat:
# 8.0-8.7 ms on the H200 before the M-RoPE position cache, target 8), twice; issue 19: INT4
# prefill throughput, GPTQ against bf16 (512 images x one output token).
source scripts/device/setup.sh
for i in 1 2; do
  timeout 150 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 \
    > $OUT/media$i.txt 2>&1; grep -A8 "^NVIDIA" $OUT/media$i.txt | head -9
done
for q in "--quantization gptq" "--dummy-weights"; do
  timeout 130 python3 -m polymodal.cli bench --skip-hf --images 512 --output-tokens 1 $q > $OUT/b.txt 2>&1
  echo "== $q"; grep -E "TTFT ms|captioning images/s|Error" $OUT/b.txt | head -3 | cut -c1-160
done
