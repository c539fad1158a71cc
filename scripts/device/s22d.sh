#!/usr/bin/env bash
# Speculative decoding's drafters on the GPU (after s22c.sh): the 7B bench without drafts, with a
# Qwen2.5-0.5B draft model and with an EAGLE-3 head at the 7B's sizes, one process each: batch-1
# decode (wall time per token), TTFT, captioning, the acceptance rate. Random weights on both
# sides: what this measures is each drafter's cost per step, not its acceptance.
source scripts/device/setup.sh
# the host KV tier on CUDA (pinned slots, copies on the step's stream, graphs)
timeout 120 python3 -m pytest -p no:cacheprovider -q tests/llm_core/test_kv_offload.py \
  tests/llm_core/test_mtp.py -m gpu 2>&1 | tail -2  # + DeepSeek-V3's MTP drafts on CUDA
DRAFT='{"method": "draft_model", "model": "sdk/configs/qwen2_5_0_5b", "num_speculative_tokens": 4}'
# a synthetic EAGLE-3 config (sdk/configs/eagle3_qwen2_5_vl_7b)
EAGLE='{"method": "eagle3", "model": "sdk/configs/eagle3_qwen2_5_vl_7b", "num_speculative_tokens": 3}'
for spec in "" "$DRAFT" "$EAGLE"; do
  timeout 180 python3 -m polymodal.cli bench --skip-hf --dummy-weights --images 64 \
    ${spec:+--speculative-config "$spec"} --json $OUT/drafter${spec:+_${#spec}}.json 2>&1 \
    | grep -E "decode|speculative|TTFT|captioning" | head -8
done
