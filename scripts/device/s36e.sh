#!/usr/bin/env bash
# Issue 19 (FP8 batch-1 decode 82.7-83.6% of its bytes floor, target 85%): where an FP8 decode
# step goes, kernel by kernel (`--profile`'s decode table: busy time charged to the kernel that
# ends it, i.e. each kernel's marginal cost under PDL, and the idle gaps), bf16 beside it.
source scripts/device/setup.sh
for q in "--quantization fp8" "--dummy-weights"; do
  timeout 200 python3 -m polymodal.cli bench --skip-hf --images 16 --profile $q > $OUT/prof.txt 2>&1
  echo "== $q"; grep -E "tok/s|floor" $OUT/prof.txt | head -4 | cut -c1-160
  grep -A30 "^batch-1 decode:" $OUT/prof.txt | grep -B30 -m1 "^TTFT GPU" | cut -c1-150
done
