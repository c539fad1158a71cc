#!/usr/bin/env bash
# Nineteenth session, run c: the FP8 and INT4 GEMVs' first weight tile loaded before the PDL
# wait (as the 16-bit GEMV's): GPU tests, then the quantized engine benches A/B against the
# commit before (unpacked first as an untracked folder: `git archive HEAD | tar -x -C abold`).
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/old ./abold \
  2>&1 | grep -v -i warn | tail -1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/llm_core/test_quant_gpu.py \
  -k "fp8_linear or graph_replay or greedy or (int4_gemv and bfloat16)" 2>&1 | tail -3
for q in fp8 awq; do
  for side in new old; do
    if [ $side = old ]; then pp=/tmp/old:/tmp/site; else pp=/tmp/site; fi
    echo "== $q $side"
    PYTHONPATH=$pp timeout 85 python3 -m polymodal.cli bench --skip-hf --images 128 \
      --quantization $q 2>&1 | grep -i "decode\|ttft\|caption\|error" | head -6
  done
done
