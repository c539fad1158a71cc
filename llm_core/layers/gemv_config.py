"""Launch parameters of the few-row GEMV (`gemv.gemv`): `GemvConfig` and the default pick
from a shape and the device's SM count (`default_config`), 16-bit or FP8 weights."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

TILE_ELEMENTS = 8192  # weight elements per program and K step in the default config
# One-row launches whose whole K fits one tile this wide load every weight before the PDL
# wait, so they stream while the kernel before them (decode attention, a short GEMV) runs:
# H100, Qwen2.5-VL-7B FP8 decode 324.0 -> 338.4 tok/s (docs/performance.md, s36i.sh)
ONE_TILE_MAX_K = 4096


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of `gemv`; block sizes are powers of two."""

    block_n: int = 32  # output features per program
    block_k: int = 256  # K elements per weight tile
    split_k: int = 1  # programs sharing one block of features (fp32 partials when > 1)
    num_warps: int = 4
    num_stages: int = 1  # `gemv`: the same code for 1..4 (its plain range is not pipelined);
    # the MoE expert kernels: their K loop through shared memory (`tl.range`) when > 1
    prefetch: bool = False  # the MoE expert kernels (`moe_decode`): the next tile a tile ahead
    fma2d: bool = True  # one row of FP8 weights: `gemv.fma_tile`'s 2-D accumulator (else sums)

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name}={value} must be a power of two")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"GemvConfig split_k/num_stages must be >= 1: {self}")
        if self.prefetch and self.num_stages > 1:
            raise ValueError(f"GemvConfig prefetch and num_stages > 1 exclude: {self}")


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in on CPU (interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def default_config(
    m: int, n: int, k: int, sms: int, silu_mul: bool = False, fp8: bool = False
) -> GemvConfig:
    """About 4 programs per SM, each loading `TILE_ELEMENTS` of weight per K step.

    FP8 weights, one row: `_fp8_one_row_config`.

    The feature block is the widest of 32 .. 4 that still gives that many programs, but at
    least 4 features per padded x row (every program reads all of x; this keeps x traffic at
    most a quarter of the weight's). K splits only while programs are short, 2+ tiles each.
    """
    if m == 1 and n >= 2048 and k >= 2048:
        return _fp8_one_row_config(n, k) if fp8 else _one_row_config(n, k, silu_mul)
    rows = triton.next_power_of_2(max(m, 1))
    target = 4 * sms
    block_n = next((b for b in (32, 16, 8) if triton.cdiv(n, b) >= target), 4)
    block_n = min(max(block_n, 4 * rows), 32)
    if fp8 and m == 1:
        block_n = 8
    block_k = min(TILE_ELEMENTS // block_n, max(16, triton.next_power_of_2(k)))
    k_tiles = triton.cdiv(k, block_k)
    split_k = 1
    while split_k < 8 and triton.cdiv(n, block_n) * split_k < target and k_tiles >= 4 * split_k:
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)


def _one_row_config(n: int, k: int, silu_mul: bool) -> GemvConfig:
    """Batch-1 decode, from H200 sweeps of Qwen2.5-VL-7B's shapes under programmatic dependent
    launch (`scripts/bench_kernels.py --gemv --rows 1`, docs/performance.md): narrow feature
    blocks and long K tiles; only a long K (down_proj) splits. Times: cuBLAS -> this."""
    if k > 8192:  # down_proj 3584 x 18944
        if silu_mul:  # as decode runs it, SiLU*mul on load: 38.4 (+ the SiLU kernel) -> 35.1 us
            return GemvConfig(block_n=8, block_k=2048, split_k=4, num_warps=8, num_stages=3)
        return GemvConfig(block_n=32, block_k=256, split_k=8, num_warps=8, num_stages=3)  # 35.4
    if k <= ONE_TILE_MAX_K:  # qkv, o, gate_up, LM head: one whole-K tile of 4 features a
        # program, every weight load before the PDL wait (H100, the engine's decode: LM head
        # bf16 +0.2%, qkv / o / gate_up +0.1%; Qwen3-30B-A3B 2.989 -> 2.941 ms a token)
        return GemvConfig(block_n=4, block_k=triton.next_power_of_2(k))
    if n >= 65536:  # LM head 152064 x 3584 (K over a tile): 258 -> 242 us
        return GemvConfig(block_n=32, block_k=256, num_stages=3)
    if n >= 16384:  # gate_up 37888 x 3584: 70.6 -> 62.4 us
        return GemvConfig(block_n=8, block_k=512)
    # qkv 4608 x 3584: 11.4 -> 9.5 us; o_proj 3584 x 3584: 11.7 -> 7.1 us (2 warps; 8.2 with 4)
    return GemvConfig(block_n=4, block_k=2048, num_warps=2 if n <= 4096 else 4)


def _fp8_one_row_config(n: int, k: int) -> GemvConfig:
    """E4M3 weights, one row (`gemv(w_scale=)`), from the H100 sweeps (`scripts/
    bench_quant_kernels.py --only fp8_w8a16`, docs/performance.md; first defaults -> these,
    us; then the engine's decode, `scripts/device/fp8_configs.py`): K up to `ONE_TILE_MAX_K`
    (qkv, o, gate_up) one whole-K tile of 8 features a program, summed per row; down
    `fma_tile`'s 2-D accumulator (<= 64 fp32 a thread); no K split."""
    if k > 8192:  # down 3584 x 18944: 29.5 -> 27.6 (26.3 summed per row, 10% slower decode)
        return GemvConfig(block_n=8, block_k=1024)
    if k <= ONE_TILE_MAX_K:  # qkv, o, gate_up as one whole-K tile a program, summed per row
        return GemvConfig(block_n=8, block_k=triton.next_power_of_2(k), fma2d=False)
    if n >= 16384:  # gate_up 37888 x 3584: 48.8 -> 45.6
        return GemvConfig(block_n=4, block_k=1024, num_warps=2, fma2d=False)
    if n <= 4096:  # o_proj 3584 x 3584: 7.3 -> 6.1-6.3
        return GemvConfig(block_n=8, block_k=1024)
    return GemvConfig(block_n=8, block_k=512, num_warps=8)  # qkv 4608 x 3584: 10.0 -> 7.5
