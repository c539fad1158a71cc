#!/usr/bin/env bash
# Next session's first run (written in the thirty-sixth): the q / k head-norm kernel with
# several heads a program (default since the thirty-sixth, not yet timed) against a head a
# program, alternating, on Gemma-3-12B-it's TTFT (its kernel table: 9.1 us a launch before);
# then its GPU test.
source scripts/device/setup.sh
for v in default one default one; do
  timeout 110 python3 scripts/device/qk_heads_ab.py $v > $OUT/g.txt 2>&1
  grep -E "^== |TTFT ms|Error" $OUT/g.txt | head -3 | cut -c1-160
done
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/llm_core/test_triton_norm_gpu.py 2>&1 | tail -2
