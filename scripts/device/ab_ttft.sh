#!/usr/bin/env bash
# A/B of 448 px / 1080p TTFT: this checkout vs another commit, unpacked first as an untracked
# folder: `git archive COMMIT | tar -x -C abold` (it travels with the working tree).
source scripts/device/setup.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/old ./abold 2>&1 | grep -v -i warn | tail -1
timeout 110 python3 scripts/device/ab_ttft.py new 2>&1 | grep "calls"
PYTHONPATH=/tmp/old:/tmp/site timeout 110 python3 scripts/device/ab_ttft.py old 2>&1 | grep "calls"
