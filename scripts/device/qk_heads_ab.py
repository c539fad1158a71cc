"""Thirty-sixth session: Gemma-3-12B-it's TTFT (`polymodal bench MODEL --dummy-weights
--skip-hf --images 32`) with the q / k head norms a head a program (`one`: the grid before,
6,888 single-warp programs for a 287-token prefill) or `qk_heads_per_program`'s blocks
(`default`: 8 heads of 256 a program), one variant a process.

    python3 scripts/device/qk_heads_ab.py default|one [MODEL]
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import triton_norm

variant = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "gemma-3-12b-it"
if variant == "one":
    triton_norm.qk_heads_per_program = lambda head_dim: 1
print(f"== q/k norm heads a program: {variant} ({model})", flush=True)
main(["bench", model, "--dummy-weights", "--skip-hf", "--images", "32"])
