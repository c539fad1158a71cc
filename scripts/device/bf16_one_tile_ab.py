"""The 16-bit one-row GEMVs of K <= 4096 (qkv, o_proj, gate_up) as one whole-K tile a program
(the default since the thirty-fifth session: every weight load issued before the PDL wait, as
FP8's; Qwen3-30B-A3B 2.989 -> 2.941 ms a token on an H100) or as the tiles before it: the
engine bench, bf16, one variant a process.

    python3 scripts/device/bf16_one_tile_ab.py default|tiled|one-tile-8 [MODEL]

tiled: qkv / o 4 features x 2048 (2 warps up to 4096 features), gate_up 8 x 512; one-tile-8:
8 features x next_pow2(K), 8 warps. The LM head stays one tile in every variant.
"""

import sys

import triton

from polymodal.cli import main
from polymodal.llm_core.layers import gemv_config

variant = sys.argv[1]
if variant != "default":
    one_row = gemv_config._one_row_config
    GemvConfig = gemv_config.GemvConfig

    def picked(n, k, silu_mul):
        if k > gemv_config.ONE_TILE_MAX_K or n >= 65536:
            return one_row(n, k, silu_mul)
        if variant == "one-tile-8":
            return GemvConfig(block_n=8, block_k=triton.next_power_of_2(k), num_warps=8)
        if n >= 16384:
            return GemvConfig(block_n=8, block_k=512)
        return GemvConfig(block_n=4, block_k=2048, num_warps=2 if n <= 4096 else 4)

    gemv_config._one_row_config = picked
print(f"== {variant}", flush=True)
model = sys.argv[2:3]
main(["bench", *model, "--skip-hf", "--images", "8", "--dummy-weights"])
