#!/usr/bin/env bash
# After s25a.sh: the 7B bench (random weights) without drafts, with n-gram drafts, a Qwen2.5-0.5B
# draft model and a synthetic EAGLE-3 head, one process each: batch-1 decode (wall time per token),
# TTFT, captioning and the acceptance rate (and Medusa heads). Random weights on both sides: what this measures is
# each drafter's cost per step, not its acceptance (the rate is whatever the random model repeats).
source scripts/device/setup.sh
NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
DRAFT='{"method": "draft_model", "model": "sdk/configs/qwen2_5_0_5b", "num_speculative_tokens": 4}'
EAGLE='{"method": "eagle3", "model": "sdk/configs/eagle3_qwen2_5_vl_7b", "num_speculative_tokens": 3}'
MEDUSA='{"method": "medusa", "model": "sdk/configs/medusa_qwen2_5_vl_7b", "num_speculative_tokens": 3}'
for spec in "" "$NGRAM" "$DRAFT" "$EAGLE" "$MEDUSA"; do
  echo "== ${spec:-no drafts}" | cut -c1-60
  timeout 115 python3 -m polymodal.cli bench --skip-hf --dummy-weights --images 64 \
    ${spec:+--speculative-config "$spec"} --json $OUT/drafter${spec:+_${#spec}}.json 2>&1 \
    | grep -E "decode|speculative|TTFT|captioning|Error|error" | head -8
done
