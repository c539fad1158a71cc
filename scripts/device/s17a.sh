#!/usr/bin/env bash
# Seventeenth session, run a: profiles that feed this session's work: Qwen3-MoE batch-1 decode
# kernel table, multi-LoRA decode (B = 1, 64) with its kernel table and per-site kernels, the
# first-call host profiles under the "second" SDPA shape policy. Logs: $OUT.
source scripts/device/setup.sh
timeout 120 python3 scripts/bench_text_decode.py qwen3-30b-a3b --prompts 16 --tokens 16 \
  --profile --json $OUT/moe.json > $OUT/moe.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$' $OUT/moe.log | tail -30 | cut -c1-160
timeout 200 python3 scripts/bench_lora.py --batch 1,64 --steps 30 --profile > $OUT/lora.log 2>&1
tail -45 $OUT/lora.log | cut -c1-160
timeout 120 python3 scripts/bench_lora.py --batch 1,64 --kernels > $OUT/lora_kernels.log 2>&1
tail -30 $OUT/lora_kernels.log | cut -c1-160
timeout 170 python3 scripts/device/first_calls.py second > $OUT/first_calls.log 2>&1
grep -v "^ *[0-9]* *0.000" $OUT/first_calls.log | cut -c1-150 | head -60
