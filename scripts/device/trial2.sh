#!/usr/bin/env bash
# GPU checks of the fifteenth session's second merge (Gemma 3 fused norms + ViT fusions, MoE
# decode, Whisper step), then their benches; ordered so a cut run keeps the checks.
source scripts/device/setup.sh
timeout 75 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_triton_norm_gpu.py \
  tests/llm_core/test_layer_norm_gpu.py tests/llm_core/test_whisper.py tests/llm_core/test_moe_gpu.py \
  -k "norm or whisper or captures_in_a_cuda_graph or sparse_block_fused" 2>&1 | tail -4
timeout 50 python3 -m pytest -q -p no:cacheprovider -m gpu tests/sdk/test_vl_families_gpu.py \
  -k "gemma3 and one_image" 2>&1 | tail -2
timeout 70 python3 -m polymodal.cli bench whisper-large-v3 --dummy-weights --clips 96 --hf-clips 24 2>&1 | tail -7
timeout 60 python3 -m polymodal.cli bench gemma-3-12b-it --skip-hf --images 16 --output-tokens 16 2>&1 | tail -5
timeout 50 python3 scripts/bench_text_decode.py qwen3-30b-a3b --prompts 8 --tokens 4 --json /tmp/m.json > /dev/null 2>&1
python3 -c "import json; r=json.load(open('/tmp/m.json')); print({k: r[k] for k in ('decode_ms', 'decode_floor_ms', 'decode_of_floor')})"
