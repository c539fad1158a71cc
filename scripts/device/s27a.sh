#!/usr/bin/env bash
# Twenty-seventh session, first run: the routed text bench (`polymodal bench TEXT-MODEL`) end to
# end with Qwen3-30B-A3B's decode-step kernel table, then Gemma-3-12B and DeepSeek-V3 reduced.
source scripts/device/setup.sh
timeout 200 python3 -m polymodal.cli bench qwen3-30b-a3b --dummy-weights --skip-hf --images 16 \
  --output-tokens 16 --profile 2>&1 | grep -v '^ *"' | tail -40
timeout 170 python3 -m polymodal.cli bench gemma-3-12b --dummy-weights --skip-hf --images 64 \
  --output-tokens 64 2>&1 | tail -6
timeout 150 python3 -m polymodal.cli bench deepseek-v3-reduced --dummy-weights --skip-hf \
  --images 16 --output-tokens 16 2>&1 | tail -6
