#!/usr/bin/env bash
# Next session's third run (written in the thirty-fifth). Issue 19, FP8 captioning (1.21-1.23x
# bf16 at 256 images on an H100, target 1.4x) with the FP8 KV cache too (W8A8 + FP8 KV, the
# issue's scheme; decode attention reads half the bytes, the pool holds twice the tokens; never
# benched end to end): 256 images, alternating, then bf16.
source scripts/device/setup.sh
for kv in "--kv-cache-dtype fp8" "" "--kv-cache-dtype fp8" ""; do
  timeout 110 python3 -m polymodal.cli bench --skip-hf --images 256 --quantization fp8 $kv \
    > $OUT/b.txt 2>&1
  echo "== fp8 $kv"; grep -E "decode tok/s|TTFT ms|captioning images/s|^quantization|Error" $OUT/b.txt | head -5 | cut -c1-160
done
timeout 110 python3 -m polymodal.cli bench --skip-hf --images 256 --dummy-weights > $OUT/b.txt 2>&1
echo "== bf16"; grep -E "decode tok/s|captioning images/s|Error" $OUT/b.txt | head -3 | cut -c1-160
