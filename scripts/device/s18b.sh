#!/usr/bin/env bash
# Eighteenth session, run b: the server burst at 8192 tokens a step on main and on servetrial
# (as run a; artifacts/trialsrc carried), then Phi-4-multimodal's image and mixed workloads
# next to transformers.
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/trial \
  ./artifacts/trialsrc 2>&1 | grep -v -i warn | tail -1
show() { grep -A12 "^NVIDIA" "$1" | cut -c1-160; tail -3 "$1" | grep -i "error\|Trace" ; }
serve8k() { timeout 170 python3 -m polymodal.cli bench --workload serve \
  --server-args '--max-num-batched-tokens 8192' --json $OUT/$1.json > $OUT/$1.log 2>&1
  echo "== $1"; show $OUT/$1.log; }
serve8k serve_main8k
PYTHONPATH=/tmp/trial:/tmp/site serve8k serve_trial8k
timeout 280 python3 -m polymodal.cli bench phi-4-multimodal --dummy-weights --phi-workloads \
  image,mixed --clips 64 --hf-clips 16 --json $OUT/phi4mm.json > $OUT/phi4mm.log 2>&1
grep -v '^ *"\|^ *[]}{,]*$\|Processed prompts\|tokenizer you are' $OUT/phi4mm.log | tail -16 | cut -c1-160
