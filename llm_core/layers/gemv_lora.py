"""The LoRA epilogue of the one-row GEMV (`gemv.py`): a LoRA layer's low-rank term, given as
`LoRADelta` (`lora/layer.py` builds it from `lora/triton_lora.shrink`'s output), is added to
each output feature after the product is rounded to the output dtype and before the residual,
as the unfused path adds it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class LoRADelta:
    """Per-row low-rank terms a GEMV adds to its output (`lora/layer.py`): row m, feature f of
    slice s gets `y[m, s*R:(s+1)*R] @ lora_b[slot[m], f]`, where `y` is
    `lora/triton_lora.shrink`'s output and `slot[m] = token_slot[m]` (-1: no term)."""

    y: torch.Tensor  # fp32 [M, S * R]
    lora_b: torch.Tensor  # [L, N, R]
    token_slot: torch.Tensor  # int32 [>= M]
    slice_offsets: torch.Tensor  # int32 [S]: each slice's first feature (0 first)


@triton.jit
def lora_rows(slot_ptr, b_ptr, slice_ptr, offs_m, offs_n, n_mask, M, N, R,
              NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """`LoRADelta`'s weights of this feature block: each row's slot `[BLOCK_M]`, its B rows
    `[BLOCK_N, BLOCK_M, BLOCK_R]` (fp32, zeros for rows without a slot) and each feature's
    slice `[BLOCK_N]`."""
    slots = tl.load(slot_ptr + offs_m, mask=offs_m < M, other=-1)
    rs = tl.arange(0, BLOCK_R)
    mask = (slots >= 0)[None, :, None] & n_mask[:, None, None] & (rs < R)[None, None, :]
    rows = b_ptr + slots.to(tl.int64)[None, :, None] * N * R + offs_n[:, None, None] * R
    lora_b = tl.load(rows + rs[None, None, :], mask=mask, other=0.0).to(tl.float32)
    piece = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for s in tl.static_range(1, NUM_SLICES):
        piece += (offs_n >= tl.load(slice_ptr + s)).to(tl.int32)
    return slots, lora_b, piece


@triton.jit
def lora_delta(y_ptr, lora_b, slots, piece, offs_m, R, NUM_SLICES: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """`delta [BLOCK_N, BLOCK_M]` of `LoRADelta` from `lora_rows`' values; y rows are
    loaded only for the slices this feature block holds (mostly one)."""
    rs = tl.arange(0, BLOCK_R)
    width = NUM_SLICES * R
    mask = (slots >= 0)[:, None] & (rs < R)[None, :]
    rows = y_ptr + offs_m[:, None] * width + rs[None, :]  # [BLOCK_M, BLOCK_R]
    delta = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for s in tl.static_range(NUM_SLICES):
        held = tl.max((piece == s).to(tl.int32), 0) > 0
        y = tl.load(rows + s * R, mask=mask & held, other=0.0)
        part = tl.sum(lora_b * y[None, :, :], 2)  # [BLOCK_N, BLOCK_M]
        delta = tl.where((piece == s)[:, None], part, delta)
    return delta
