"""The 16-bit LM head's one-row GEMV as one whole-K tile a program (the default since the
thirty-fourth session: 4 features x next_pow2(K)) or the tiled config before it (32 x 256, 3
stages): the engine bench, bf16, one variant a process.

    python3 scripts/device/lm_head_ab.py one-tile|tiled [MODEL]
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import gemv_config

variant = sys.argv[1]
if variant == "tiled":
    one_row = gemv_config._one_row_config

    def tiled(n, k, silu_mul):
        if n >= 65536:
            return gemv_config.GemvConfig(block_n=32, block_k=256, num_stages=3)
        return one_row(n, k, silu_mul)

    gemv_config._one_row_config = tiled
print(f"== {variant}", flush=True)
model = sys.argv[2:3]  # a VL family (its TTFT against the floor), else the 7B engine bench
main(["bench", *model, "--skip-hf", "--images", "32" if model else "8", "--dummy-weights"])
