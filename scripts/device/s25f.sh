#!/usr/bin/env bash
# s25e.sh trimmed for a device budget of ~10 minutes: the Gemma-3-12B decode A/B (one pair),
# then the speculative drafters' GPU tests.
source scripts/device/setup.sh
timeout 240 python3 -c "
import sys; sys.path.insert(0, 'scripts'); sys.path.insert(0, 'scripts/device')
from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.llm_core.attention import triton_backend
from bench_text_decode import variant_ms
one = triton_backend.split_keys
model, bw = resolve_bench_model('gemma-3-12b'), measure_bandwidth()
triton_backend.split_keys = lambda block_n: 64
variant_ms('64 keys a split (before)', model, bw)
triton_backend.split_keys = one
variant_ms('one 32-key tile a split', model, bw)
" 2>&1 | grep -E "split|Error" | tail -3
timeout 150 python3 -m pytest -p no:cacheprovider -q -x tests/llm_core/test_speculative_gpu.py \
  2>&1 | tail -3
