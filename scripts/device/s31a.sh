#!/usr/bin/env bash
# Next session's first run (written after the twenty-ninth session's device budget was spent):
# s31a2.sh (the GPU tests of the fresh chunk's pack launch and of the Llama 4 tower, the reduced
# Llama 4 bench), then the pack launch's A/B on fresh 1080p and 4K images (one engine).
source scripts/device/s31a2.sh
timeout 250 python3 scripts/device/pack_ab.py 2>&1 | grep -E "^pack|Error"
