"""Issue 19: FP8 W8A16 batch-1 decode under alternative one-row configs of the decoder's four
linears (qkv, o, gate_up, down), each the engine bench (`polymodal bench --quantization fp8
--skip-hf`) in one process, one after the other: the kernel sweep runs without the engine's
programmatic dependent launch and folds, and its winners can lose end to end.

    python3 scripts/device/fp8_configs.py [VARIANT ...]   # all by default

Each variant in a process of its own (`scripts/device/s33b.sh`): six engines in one process
ran out of GPU memory.
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import gemv_config
from polymodal.llm_core.layers.gemv_config import GemvConfig as C

DEFAULT = gemv_config._fp8_one_row_config
DEFAULT16 = gemv_config._one_row_config
SUMS = {"fma2d": False}
VARIANTS = {
    "default": {},
    "down 8x2048 8w": {"down": C(8, 2048, num_warps=8)},
    "down 16x512": {"down": C(16, 512)},
    "down 4x2048": {"down": C(4, 2048)},
    "down 8x512 2w": {"down": C(8, 512, num_warps=2)},
    "down 16x1024 8w": {"down": C(16, 1024, num_warps=8)},
    "gate_up sums 8x1024": {"gate_up": C(8, 1024, **SUMS)},
    "gate_up sums 4x2048": {"gate_up": C(4, 2048, **SUMS)},
    "gate_up sums 4x512 1w": {"gate_up": C(4, 512, num_warps=1, **SUMS)},
    "qkv sums 4x1024 2w": {"qkv": C(4, 1024, num_warps=2, **SUMS)},
    "o sums 4x1024 2w": {"o": C(4, 1024, num_warps=2, **SUMS)},
    # the whole K in one tile (3584 of 4096 lanes), so every weight load is issued before the
    # PDL wait: o's while the (latency-bound) decode attention runs; 4 programs an SM fit
    "o one tile 8x4096 sums": {"o": C(8, 4096, **SUMS)},
    "o one tile 4x4096 2w sums": {"o": C(4, 4096, num_warps=2, **SUMS)},
    "qkv+o one tile 8x4096 sums": {"qkv": C(8, 4096, **SUMS), "o": C(8, 4096, **SUMS)},
    "qkv+o+gate_up one tile": {
        "qkv": C(8, 4096, **SUMS),
        "o": C(8, 4096, **SUMS),
        "gate_up": C(4, 4096, **SUMS),
    },
    "qkv 16x4096 8w + o one tile": {
        "qkv": C(16, 4096, num_warps=8, **SUMS),
        "o": C(8, 4096, **SUMS),
    },  # fmt: skip
    "qkv+o one tile, gate_up 8x4096": {
        "qkv": C(8, 4096, **SUMS),
        "o": C(8, 4096, **SUMS),
        "gate_up": C(8, 4096, **SUMS),
    },
    "one tile, gate_up 16x4096 8w": {
        "qkv": C(8, 4096, **SUMS),
        "o": C(8, 4096, **SUMS),
        "gate_up": C(16, 4096, num_warps=8, **SUMS),
    },
    "one tile, o 4x4096 2w": {
        "qkv": C(8, 4096, **SUMS),
        "o": C(4, 4096, num_warps=2, **SUMS),
        "gate_up": C(8, 4096, **SUMS),
    },
    "one tile, qkv+o 4x4096 2w": {
        "qkv": C(4, 4096, num_warps=2, **SUMS),
        "o": C(4, 4096, num_warps=2, **SUMS),
        "gate_up": C(8, 4096, **SUMS),
    },
    "one tile 8 warps": {
        "qkv": C(8, 4096, num_warps=8, **SUMS),
        "o": C(8, 4096, num_warps=8, **SUMS),
        "gate_up": C(8, 4096, num_warps=8, **SUMS),
    },
    "one tile, gate_up 8w": {
        "qkv": C(8, 4096, **SUMS),
        "o": C(8, 4096, **SUMS),
        "gate_up": C(8, 4096, num_warps=8, **SUMS),
    },
    "one tile + LM head 4x4096": {
        "qkv": C(8, 4096, **SUMS),
        "o": C(8, 4096, **SUMS),
        "gate_up": C(8, 4096, **SUMS),
        "lm_head": C(4, 4096),
    },
    "default again": {},
}


def part(n: int, k: int) -> str:
    return "down" if k > 8192 else "gate_up" if n >= 16384 else "o" if n <= 4096 else "qkv"


for label in sys.argv[1:] or VARIANTS:
    tiles = VARIANTS[label]
    gemv_config._fp8_one_row_config = lambda n, k, tiles=tiles: (
        tiles.get(part(n, k)) or DEFAULT(n, k)
    )
    gemv_config._one_row_config = lambda n, k, silu_mul, tiles=tiles: (
        tiles.get("lm_head") if n >= 65536 and "lm_head" in tiles else DEFAULT16(n, k, silu_mul)
    )  # the 16-bit LM head
    gemv_config.default_config.cache_clear()
    print(f"== {label}", flush=True)
    main(["bench", "--skip-hf", "--images", "8", "--quantization", "fp8"])
