#!/usr/bin/env bash
# Next session's third run (written in the thirty-fourth). Issue 19's "INT4 prefill throughput
# >= 0.8x bf16": prefill throughput as users load it, many prompts at once (512 images, one
# output token each: the tower and the decoder's prefill in full 8192-token steps, where the
# INT4 weights' dequantization for cuBLAS amortizes over the step's rows), AWQ and GPTQ against
# bf16, alternating; the one-image TTFT (0.76x) is the latency side.
source scripts/device/setup.sh
for q in "--quantization awq" "--dummy-weights" "--quantization gptq" "--dummy-weights"; do
  timeout 130 python3 -m polymodal.cli bench --skip-hf --images 512 --output-tokens 1 $q > $OUT/b.txt 2>&1
  echo "== $q"; grep -E "TTFT ms|captioning images/s|Error" $OUT/b.txt | head -3 | cut -c1-160
done
