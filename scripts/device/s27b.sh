#!/usr/bin/env bash
# Twenty-seventh session, second run: where a fresh 1080p / 4K / 64-frame TTFT's time goes
# (`polymodal bench --workload media --profile`), on the current main.
source scripts/device/setup.sh
timeout 560 python3 -m polymodal.cli bench --workload media --skip-hf --images 16 --profile \
  2>&1 | grep -v '^ *"\|^video\|^4k\|^1080p\|^448px' | tail -120
