"""Issue 19: FP8 captioning and TTFT with W8A8's activation quantization read once a row
(`fp8_kernels.quantize_rows`, the default) or in two passes of 1024-feature loads
(`ONE_PASS_MAX` = 0, before), then bf16: the engine bench (`polymodal bench --skip-hf`,
random weights), one variant a process.

    python3 scripts/device/fp8_quant_ab.py "one pass" | "two passes" | bf16 [IMAGES]
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import fp8_kernels

label = sys.argv[1]
images = sys.argv[2] if len(sys.argv) > 2 else "128"
if label == "two passes":
    fp8_kernels.ONE_PASS_MAX = 0
quant = ["--dummy-weights"] if label == "bf16" else ["--quantization", "fp8"]
print(f"== {label}", flush=True)
main(["bench", "--skip-hf", "--images", images, *quant])
