"""Launch plans of the multi-LoRA kernels (`triton_lora.py`): the knobs of `shrink` and
`expand` (`ShrinkConfig`, `ExpandConfig`, swept by `scripts/bench_lora.py --kernels`) and the
plans derived from a step's shape (`split_plan`, `shrink_plan`, `expand_config`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import triton

DOT_ROWS = 16  # token block of the tl.dot paths (tl.dot pads M to 16)
MAX_SPLITS = 256  # K chunks of a shrink at most (bounds the partials and the final sum)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of `shrink` (`scripts/bench_lora.py --kernels` sweeps them).

    Defaults, reasoned (H200, Qwen2.5-VL-7B, rank 16): a shrink moves little (A is 0.1-0.6 MB a
    slot) and is latency-bound, so what counts is busy programs with short dependent chains:
    about `programs_per_sm` busy programs per SM (K = 18944 at one token: 148 chunks of one
    128-wide tile instead of 30 of five), one tile per chunk allowed (`min_tiles`)."""

    block_k: int = 128  # A tile width
    min_tiles: int = 1  # A tiles per K chunk at least (multiply-and-sum steps)
    dot_min_tiles: int = 4  # the same for tl.dot steps (H200, B = 64: 28 one-tile chunks of
    # the qkv shrink took 17.6 us, 7 four-tile chunks 6.3: the final sum costs more than a loop)
    programs_per_sm: int = 4  # busy programs `split_plan` aims for, per SM
    fma_rows: int = 8  # steps of <= this many tokens: multiply-and-sum rows, not tl.dot's 16
    num_warps: int = 4


@dataclass(frozen=True)
class ExpandConfig:
    """Launch parameters of `expand` (`expand_config` picks them; the bench sweeps them)."""

    block_n: int = 128  # output features per program
    block_m: int = DOT_ROWS  # tokens per block (>= 16: tl.dot)
    token_programs: int | None = None  # programs per (N block, slot, slice) along the tokens,
    # each walking every token_programs-th block of its slot; None: one per block of the step
    num_warps: int = 4


def split_plan(k: int, work: int, sms: int, config: ShrinkConfig | None = None):
    """`(block_k, chunk, splits)` of a shrink over `k` input features, where `work` is the
    (token block x N block) tiles of the step: A tiles of `block_k`, `chunk` (a multiple of it)
    per program, `splits = cdiv(k, chunk)` chunks, about `programs_per_sm * sms / work` of them
    (at most MAX_SPLITS, chunks of >= `min_tiles` tiles). The busy programs are then about
    `programs_per_sm` an SM when the tokens spread over the slots (each token block is one
    slot's). Prefill-sized steps have `work` enough: one chunk, y stored directly. The
    interpreter takes 32-wide tiles, so small test shapes split too."""
    config = config or ShrinkConfig()
    block_k, min_tiles = (32, 1) if interpreted() else (config.block_k, config.min_tiles)
    tiles = max(1, triton.cdiv(k, block_k))
    wanted = max(1, min(MAX_SPLITS, triton.cdiv(config.programs_per_sm * sms, max(1, work))))
    per_split = max(min_tiles, triton.cdiv(tiles, wanted))
    return block_k, per_split * block_k, triton.cdiv(tiles, per_split)


def shrink_plan(num_tokens: int, n: int, k: int, sms: int, config: ShrinkConfig | None = None):
    """`(block_m, block_n, block_k, chunk, splits)` of a shrink of `num_tokens` tokens to `n`
    outputs over `k` features: token blocks of 16 for tl.dot, or the padded token count for
    the multiply-and-sum path (<= `fma_rows` tokens); all of `n` (<= 64) in one block."""
    config = config or ShrinkConfig()
    fma = num_tokens <= config.fma_rows
    block_m = triton.next_power_of_2(max(num_tokens, 1)) if fma else DOT_ROWS
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    work = triton.cdiv(num_tokens, block_m) * triton.cdiv(n, block_n)
    if not fma:
        config = replace(config, min_tiles=max(config.min_tiles, config.dot_min_tiles))
    return block_m, block_n, *split_plan(k, work, sms, config)


def expand_config(num_tokens: int, out_features: int, sms: int, slots: int) -> ExpandConfig:
    """128 output features per program when that still gives a busy program per SM with the
    tokens spread over the slots, else 64 (H200, B = 64: 256-wide blocks were slower at every
    site, e.g. gate_up 8.3 us against 6.7 at 128); the programs along the tokens are as many
    as such a step's token blocks per slot, so a round-robin decode step has no idle program
    along the tokens (a step of one adapter walks `slots` blocks a program)."""
    token_blocks = triton.cdiv(max(num_tokens, 1), DOT_ROWS)
    block_n = 128 if triton.cdiv(out_features, 128) * token_blocks >= sms else 64
    return ExpandConfig(
        block_n=block_n,
        token_programs=triton.cdiv(token_blocks, max(1, slots)),
    )
