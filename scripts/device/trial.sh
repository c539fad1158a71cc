#!/usr/bin/env bash
# GPU checks of this session's merged branches (causal SDPA with context, BERT, speech benches).
source scripts/device/setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_varlen_sdpa_gpu.py \
  tests/llm_core/test_layer_norm_gpu.py tests/llm_core/test_families_gpu.py::test_pooling_models_on_cuda 2>&1 | tail -4
timeout 80 python3 scripts/bench_causal_sdpa.py 2>&1 | tail -12
timeout 100 python3 scripts/bench_bert.py --json /tmp/bert.json > /tmp/bert.log 2>&1; tail -3 /tmp/bert.log
python3 -c "import json; r = json.load(open('/tmp/bert.json')); print({k: v for k, v in r.items() if not isinstance(v, (list, dict))})"
timeout 130 python3 -m polymodal.cli bench whisper-large-v3 --dummy-weights --clips 128 --json /tmp/w.json 2>&1 | tail -12
timeout 130 python3 -m polymodal.cli bench phi-4-multimodal --dummy-weights --clips 64 --phi-workloads audio --json /tmp/p.json 2>&1 | tail -12
