"""Issue 19: FP8 captioning and TTFT with the defaults ("one pass"), W8A8's activation
quantization in two passes of 1024-feature loads (`fp8_kernels.ONE_PASS_MAX` = 0), decode
batches on cuBLAS rather than the Triton GEMM's narrow tiles (`fp8.TRITON_MAX_ROWS` = 0), or
bf16: the engine bench (`polymodal bench --skip-hf`, random weights), one variant a process.

    python3 scripts/device/fp8_quant_ab.py "one pass" | "two passes" | cublas | triton128 | bf16
        [IMAGES]

triton128: decode batches of 65-128 rows on the Triton GEMM too, each 7B shape on its best
tile of the thirty-fourth session's sweep at 128 rows (down split-K 4).
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
if label == "triton128":  # 65-128 rows on the thirty-fourth session's best tiles at 128 rows
    fp8.TRITON_MAX_ROWS = 128
    gemm = fp8_kernels.fp8_gemm
    TILES = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) by (N, K)
        (4608, 3584): (128, 64, 256, 8, 4, 1),  # qkv 13.5 us vs cuBLAS 15.5
        (3584, 3584): (64, 32, 256, 4, 4, 1),  # o 10.7 vs 14.9
        (37888, 3584): (64, 64, 128, 4, 4, 1),  # gate_up 65.3 vs 64.8
        (3584, 18944): (128, 64, 128, 8, 4, 4),  # down 41.2 vs 52.5
    }
    KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K")

    def tiled(x, weight, w_scale, block=None, bias=None, out_dtype=None, config=None):
        tile = TILES.get(tuple(weight.shape)) if x.shape[0] > 64 and block is None else None
        config = config or (dict(zip(KEYS, tile)) if tile else None)
        return gemm(x, weight, w_scale, block, bias, out_dtype, config)

    fp8_kernels.fp8_gemm = tiled
quant = ["--dummy-weights"] if label == "bf16" else ["--quantization", "fp8"]
print(f"== {label}", flush=True)
main(["bench", "--skip-hf", "--images", images, *quant])
