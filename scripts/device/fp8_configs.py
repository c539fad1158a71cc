"""Issue 19: FP8 W8A16 batch-1 decode under alternative one-row configs for gate_up and down
(the per-row sums the kernel sweep chose vs the 2-D accumulator), each the engine bench
(`polymodal bench --quantization fp8 --skip-hf`) in one process, one after the other.

    python3 scripts/device/fp8_configs.py [more bench arguments]
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import gemv_config
from polymodal.llm_core.layers.gemv_config import GemvConfig

DEFAULT = gemv_config._fp8_one_row_config
TILES = {  # name: (gate_up, down)
    "sums (default)": (None, None),
    "2-D both": (GemvConfig(block_n=16, block_k=256), GemvConfig(block_n=8, block_k=1024)),
    "2-D gate_up": (GemvConfig(block_n=16, block_k=256), None),
    "2-D down": (None, GemvConfig(block_n=8, block_k=1024)),
    "2-D down split 4": (None, GemvConfig(block_n=8, block_k=1024, split_k=4, num_warps=8)),
}

for label, (gate_up, down) in TILES.items():

    def config(n, k, gate_up=gate_up, down=down):
        if k > 8192 and down is not None:
            return down
        if n >= 16384 and k <= 8192 and gate_up is not None:
            return gate_up
        return DEFAULT(n, k)

    gemv_config._fp8_one_row_config = config
    gemv_config.default_config.cache_clear()
    print(f"== {label}", flush=True)
    main(["bench", "--skip-hf", "--images", "8", "--quantization", "fp8", *sys.argv[1:]])
