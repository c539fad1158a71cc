"""Issue 19: INT4 (AWQ) batch-1 decode with one-row GEMV configs whose K splits give each
program one K tile (128 features x one 128-wide group), so every program's weights, scales
and zeros load before the PDL wait (as FP8's one-tile GEMVs: 81.7 -> 85.4% of their floor),
against the defaults: the engine bench (`polymodal bench --quantization awq --skip-hf
--images 8`), one variant a process.

    python3 scripts/device/int4_configs.py VARIANT
"""

import sys

from polymodal.cli import main
from polymodal.llm_core.layers import int4_gemv

DEFAULT = int4_gemv.gemv_config


def one_tile(block_n: int, k: int, tiles_each: int = 1) -> tuple:
    """(BLOCK_N, BLOCK_K, SPLIT_K, warps, prefetch) with `tiles_each` 128-wide tiles a split."""
    return (block_n, 128, -(-k // (128 * tiles_each)), 4, False)


VARIANTS = {
    "default": {},
    "o one tile": {"o": (128, 1)},
    "qkv+o one tile": {"qkv": (128, 1), "o": (128, 1)},
    "qkv+o+gate_up one tile": {"qkv": (128, 1), "o": (128, 1), "gate_up": (64, 1)},
    "qkv+o one tile, gate_up 2 tiles": {"qkv": (128, 1), "o": (128, 1), "gate_up": (64, 2)},
    "all, down 4 tiles": {"qkv": (128, 1), "o": (128, 1), "gate_up": (64, 1), "down": (128, 4)},
    "default again": {},
}


def part(n: int, k: int) -> str:
    return "down" if k > 8192 else "gate_up" if n >= 16384 else "o" if n <= 4096 else "qkv"


label = sys.argv[1]
tiles = VARIANTS[label]


def patched(m, n, k, group_size, sms):
    pick = tiles.get(part(n, k)) if m == 1 and group_size == 128 else None
    return one_tile(pick[0], k, pick[1]) if pick else DEFAULT(m, n, k, group_size, sms)


int4_gemv.gemv_config = patched
print(f"== {label}", flush=True)
main(["bench", "--skip-hf", "--images", "8", "--quantization", "awq"])
