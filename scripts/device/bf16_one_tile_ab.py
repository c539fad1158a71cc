"""The 16-bit one-row GEMVs of K <= 4096 (qkv, o_proj, gate_up; the LM head already is) as one
whole-K tile a program (every weight load issued before the PDL wait, as FP8's since the
thirty-fourth session: 81.7 -> 85.4% of its floor) or as today's tiles: the engine bench,
bf16, one variant a process.

    python3 scripts/device/bf16_one_tile_ab.py default|one-tile|one-tile-8 [MODEL]

one-tile: 4 features x next_pow2(K), 4 warps; one-tile-8: 8 features, 8 warps.
"""

import sys

import triton

from polymodal.cli import main
from polymodal.llm_core.layers import gemv_config

variant = sys.argv[1]
if variant != "default":
    one_row = gemv_config._one_row_config
    block_n, warps = (8, 8) if variant == "one-tile-8" else (4, 4)

    def one_tile(n, k, silu_mul):
        if k <= gemv_config.ONE_TILE_MAX_K and n < 65536:
            block_k = triton.next_power_of_2(k)
            return gemv_config.GemvConfig(block_n=block_n, block_k=block_k, num_warps=warps)
        return one_row(n, k, silu_mul)

    gemv_config._one_row_config = one_tile
print(f"== {variant}", flush=True)
model = sys.argv[2:3]
main(["bench", *model, "--skip-hf", "--images", "8", "--dummy-weights"])
