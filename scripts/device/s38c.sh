#!/usr/bin/env bash
# Gemma-3-12B-it TTFT: this tree's processors vs the ones before f069dfa, alternating, one
# process each. Made first, untracked: mkdir scripts/device/oldproc; for f in base pixels gemma3
# llava llava_onevision llama4 pixtral mllama hcx_vision; do git show f069dfa^:processors/$f.py
# > scripts/device/oldproc/$f.py; done
source scripts/device/setup.sh
rm -rf /tmp/old && cp -r /tmp/site /tmp/old && cp scripts/device/oldproc/*.py /tmp/old/polymodal/processors/
for v in site old site old; do
  echo "== $v"; PYTHONPATH=/tmp/$v timeout 110 python3 scripts/device/gemm_swap_ab.py linear > $OUT/bench.txt 2>&1
  grep -E "TTFT ms|floors|Error" $OUT/bench.txt | cut -c1-120
done
