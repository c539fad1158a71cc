#!/usr/bin/env bash
# Sleep mode's GPU test, and speculative decoding (n-gram drafts, a draft model) on the GPU: its GPU tests (greedy tokens of decoding
# without drafts under decode / prefill graphs and the Triton backend; the bench's report), then
# the 7B bench with and without drafts in one process each: batch-1 decode (wall time per
# token), TTFT, captioning, and the acceptance rate on random weights (whatever the random
# model repeats: the rate is the workload's, not a property of the method).
source scripts/device/setup.sh
timeout 150 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_speculative_gpu.py \
  tests/sdk/test_bench_gpu.py -k "greedy or draft or eagle" 2>&1 | tail -3  # all drafters
# sleep mode: memory given back at levels 1 and 2, graphs recaptured, the same tokens
timeout 100 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_sleep.py \
  tests/llm_core/test_vl_embedding.py -k "gpu or cuda" 2>&1 | tail -3  # + VL embeddings on CUDA
timeout 100 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_prompt_embeds.py \
  -k gpu 2>&1 | tail -2  # prompt embeddings on CUDA (bf16, graphs, a VL model's staging)
SPEC='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
for spec in "" "$SPEC"; do
  timeout 200 python3 -m polymodal.cli bench --skip-hf --dummy-weights --images 128 \
    ${spec:+--speculative-config "$spec"} --json $OUT/spec${spec:+_${#spec}}.json 2>&1 \
    | grep -E "decode|speculative|TTFT|captioning" | head -8
done
