"""Batched multi-LoRA products: the torch reference (CPU, and the oracle of the kernel tests)
and the dispatch to the Triton kernels.

Shapes, for one layer with `S` output slices (q/k/v of a packed qkv: 3; a plain layer: 1):

    x        [T, in]                 the step's flat tokens
    lora_a   [L, S * R, in]          per adapter slot, each slice's A rows (rank padded to R)
    lora_b   [L, out, R]             per adapter slot, B (scaling folded in) of the slice
                                     each output row belongs to
    y        [T, S * R]  float32     shrink: y[t, s*R:(s+1)*R] = A[slot(t), s] x[t] (the
                                     kernel sums split-K partials [splits, T, S * R] into it)
    out      [T, out]                expand: out[t, slice s] += B[slot(t), slice s] y[t, s]
    stacked  [T, out + L * S * R]    folded: `x @ [W; lora_a]^T`, the base product and every
                                     slot's y in one GEMM (the dense layers, layer.py)

Tokens are grouped by adapter slot (`LoRASegments`): the tokens of slot l are
`sorted_tokens[seg_start[l] : seg_start[l] + seg_len[l]]`; tokens without an adapter are in
no segment and left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRASegments:
    """One step's tokens grouped by adapter slot, on the device (static buffers, so a captured
    CUDA graph reads each step's values), and the same on the host for the torch path."""

    sorted_tokens: torch.Tensor  # int32 [max_tokens]: token indices, by slot
    seg_start: torch.Tensor  # int32 [L]
    seg_len: torch.Tensor  # int32 [L]
    token_slot: torch.Tensor  # int32 [max_tokens]: each token's slot, -1: none (the GEMV's)
    host_groups: list[tuple[int, torch.Tensor]]  # (slot, int64 token indices) per active slot


def lora_reference(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slices: list[tuple[int, int]],
    rank: int,
    groups: list[tuple[int, torch.Tensor]],
) -> torch.Tensor:
    """`out[t] += B[slot] A[slot] x[t]` per slice, in float32, for each `(slot, tokens)` group;
    `slices` are the layer's `(out offset, out size)`. Returns `out` (updated in place)."""
    for slot, tokens in groups:
        tokens = tokens.to(x.device)
        y = x[tokens].float() @ lora_a[slot].float().T  # [n, S * R]
        _add_delta(out, tokens, y, lora_b[slot], slices, rank)
    return out


def lora_folded_reference(
    stacked: torch.Tensor,
    out_features: int,
    lora_b: torch.Tensor,
    slices: list[tuple[int, int]],
    rank: int,
    groups: list[tuple[int, torch.Tensor]],
) -> torch.Tensor:
    """The same product when the shrink ran inside the base GEMM (`x @ [W; A_0; ...; A_L-1]^T`,
    `lora/layer.py`'s folded storage): `stacked [T, out + L * S * R]` holds the base product,
    then every slot's y (rounded to the GEMM's dtype). Returns a fresh contiguous `[T, out]`:
    the base columns, plus `B[slot] y[t, slot's columns]` for the tokens of each group."""
    out = stacked[:, :out_features].clone()
    width = (stacked.shape[1] - out_features) // lora_b.shape[0]  # S * R
    for slot, tokens in groups:
        tokens = tokens.to(stacked.device)
        begin = out_features + slot * width
        y = stacked[tokens, begin : begin + width].float()  # [n, S * R]
        _add_delta(out, tokens, y, lora_b[slot], slices, rank)
    return out


def _add_delta(out, tokens, y, lora_b, slices, rank) -> None:
    """`out[tokens, slice s] += y[:, s*R:(s+1)*R] @ lora_b[slice s]^T` (fp32, rounded once)."""
    delta = torch.empty(tokens.shape[0], out.shape[1], dtype=torch.float32, device=out.device)
    for s, (offset, size) in enumerate(slices):
        b = lora_b[offset : offset + size].float()  # [size, R]
        delta[:, offset : offset + size] = y[:, s * rank : (s + 1) * rank] @ b.T
    out.index_put_((tokens,), (out[tokens].float() + delta).to(out.dtype))


def lora_triton(
    x,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: torch.Tensor,
    slice_sizes: torch.Tensor,
    max_slice: int,
    rank: int,
    segments: LoRASegments,
    silu_mul: bool = False,
) -> torch.Tensor:
    """The same product with the Triton shrink and expand kernels (one launch each over every
    token of the step); `x` as `shrink` takes it (a `DeferredNorm`, or `[gate | up]` with
    `silu_mul`); `slice_offsets` / `slice_sizes`: int32 `[S]` on the device."""
    from polymodal.llm_core.lora import triton_lora

    y = triton_lora.shrink(x, lora_a, segments, silu_mul)
    triton_lora.expand(y, lora_b, out, slice_offsets, slice_sizes, max_slice, rank, segments)
    return out
