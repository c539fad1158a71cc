#!/usr/bin/env bash
# Next session's first run (written in the thirty-first): FP8 decode with the per-row-sum configs
# for gate_up / down (issue 19: ~84% of the floor expected), then the VL TTFTs against the
# corrected floor (SigLIP's fused fc1 counted: Gemma 3, LLaVA-OneVision; issue 18), then the
# media bench (issue 15's 1080p repeat <= 8 ms with the M-RoPE cache; on an H200 if this is one).
source scripts/device/setup.sh
timeout 60 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu tests/llm_core/test_quant_gpu.py \
  -k "fp8_linear and channel" 2>&1 | tail -2
timeout 200 python3 scripts/device/fp8_ab.py > $OUT/fp8_ab.txt 2>&1
grep -E "^==|tok/s|images/s|fraction of floor|Error" $OUT/fp8_ab.txt | cut -c1-160 | head -24
for m in gemma-3-12b-it llava-onevision-7b; do
  timeout 120 python3 -m polymodal.cli bench $m --dummy-weights --skip-hf --images 32 > $OUT/$m.txt 2>&1
  echo "== $m"; grep -E "TTFT ms|floors|Error" $OUT/$m.txt | cut -c1-300
done
timeout 150 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 \
  > $OUT/media.txt 2>&1; grep -A8 "^NVIDIA" $OUT/media.txt | head -9
