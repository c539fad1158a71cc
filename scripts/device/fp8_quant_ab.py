"""Issue 19: FP8 captioning and TTFT with the defaults ("one pass"), W8A8's activation
quantization in two passes of 1024-feature loads (`fp8_kernels.ONE_PASS_MAX` = 0), decode
batches on cuBLAS rather than the Triton GEMM's narrow tiles (`fp8.TRITON_MAX_ROWS` = 0), or
bf16: the engine bench (`polymodal bench --skip-hf`, random weights), one variant a process.

    python3 scripts/device/fp8_quant_ab.py "one pass" | "two passes" | cublas | bf16 [IMAGES]
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import fp8_kernels
from polymodal.llm_core.quantization import fp8

label = sys.argv[1]
images = sys.argv[2] if len(sys.argv) > 2 else "128"
if label == "two passes":
    fp8_kernels.ONE_PASS_MAX = 0
if label == "cublas":
    fp8.TRITON_MAX_ROWS = 0
quant = ["--dummy-weights"] if label == "bf16" else ["--quantization", "fp8"]
print(f"== {label}", flush=True)
main(["bench", "--skip-hf", "--images", images, *quant])
