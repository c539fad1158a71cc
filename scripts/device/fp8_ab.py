"""Issue 19: FP8 batch-1 decode with one row on the 16-bit GEMV over E4M3 weights (W8A16,
`fp8.ONE_ROW_W8A16`, the default) and on the E4M3 wgmma GEMV (W8A8), then bf16, each the
engine bench (`polymodal bench --skip-hf`, random weights) in one process, one after the other.

    python3 scripts/device/fp8_ab.py [more bench arguments]
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.quantization import fp8

for label, args in (
    ("fp8 W8A16 (16-bit GEMV)", ["--quantization", "fp8"]),
    ("fp8 W8A8 (E4M3 wgmma GEMV)", ["--quantization", "fp8"]),
    ("bf16", ["--dummy-weights"]),
):
    fp8.ONE_ROW_W8A16 = "W8A16" in label
    print(f"== {label}", flush=True)
    main(["bench", "--skip-hf", "--images", "64", *args, *sys.argv[1:]])
