#!/usr/bin/env bash
# Next session's first run (issue 18): s46a.sh (Mllama's bench, the norm / Mllama GPU tests with
# the gated sum's rounding fix, the TTFT profile), then the default Qwen2.5-VL-7B bench: the
# attention kernels lost their metadata alignment hints in the fortieth session; its bf16
# decode (206 tokens/s on an H100 before, issue 19's row) and captioning should not move.
bash scripts/device/s46a.sh
source scripts/device/setup.sh > /dev/null
timeout 150 python3 -m polymodal.cli bench --dummy-weights --skip-hf --images 128 > $OUT/qwen.txt 2>&1
echo "qwen rc=$?"; grep -v -i "warn\|regex" $OUT/qwen.txt | tail -6
