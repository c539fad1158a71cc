#!/usr/bin/env bash
# Twenty-seventh session, fourth run: GPU tests of the changed paths (RGB of RGBX uploads, the
# Qwen3 families' one-kernel q/k norm), Qwen3-30B-A3B decode with the q/k norms as two kernels
# vs one, then the host share and TTFT of fresh large media with Pillow's pixels read in place.
source scripts/device/setup.sh
timeout 100 python3 -m pytest -p no:cacheprovider -q -m gpu tests/llm_core/test_host_copy.py \
  tests/llm_core/test_media_staging.py tests/llm_core/test_families_gpu.py -k \
  "rgbx or stage or ring or qwen3_moe" 2>&1 | tail -2
timeout 180 python3 scripts/device/qk_ab.py 2>&1 | grep -E "kernel|Error|error" | tail -6
timeout 260 python3 scripts/device/host_media.py 2>&1 | grep -E "process_tokens|tottime|^ +[0-9]|TTFT" \
  | cut -c1-150 | head -50
