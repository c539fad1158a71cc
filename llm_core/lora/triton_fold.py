"""The expand of a LoRA layer whose shrink ran inside its base GEMM (`lora/layer.py`'s folded
storage: `[W; A of every slot]` as one weight, so `F.linear(x, stacked)` gives the base product
and every slot's `y = A x` for every token in one cuBLAS call).

`expand_folded` reads that `[T, out + L * S * R]` product and writes a fresh contiguous
`[T, out]`: for each token of slot l, `base[t] + y[t, slot l's slice s] @ B[l, slice s]^T`
(fp32 sum, rounded once, as `triton_lora.expand` rounds); for every other row of the `T`
(tokens without an adapter and a graph bucket's padding) the base columns as they are. The
result is contiguous so every consumer (q/k/v split and rotary, residual add, SiLU*mul) reads
what it reads without LoRA. The grid is `triton_lora.expand`'s with one more "slot", the rows
without an adapter (`LoRASegments`: the segment after the last slot's, up to `T`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.layers.gemv import num_sms
from polymodal.llm_core.lora.launch_plan import DOT_ROWS, ExpandConfig, expand_config, interpreted
from polymodal.llm_core.lora.ops import LoRASegments
from polymodal.llm_core.lora.triton_lora import b_tile


@triton.jit(do_not_specialize=["num_tokens", "token_step"])
def _expand_folded_kernel(
    cat_ptr,  # [T, N_out + L * S * R]: base product, then each slot's y (row stride stride_cm)
    b_ptr,  # [L, N_out, R]
    out_ptr,  # [T, N_out] out, contiguous
    sorted_ptr,
    seg_start_ptr,  # int32 [L + 1]: [L] = the adapter tokens' count (the rest start there)
    seg_len_ptr,  # int32 [L + 1]
    slice_offset_ptr,  # int32 [S]
    slice_size_ptr,  # int32 [S]
    num_tokens,  # T: rows of cat / out (a graph bucket's, padding included)
    token_step,  # tokens between a program's blocks: BLOCK_M x programs along the tokens
    N_out,
    R,
    stride_cm,
    stride_bl,
    stride_bn,
    NUM_SLOTS: tl.constexpr,  # L; program slot L copies the rows without an adapter
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (token program, N block, slot x slice): its B tile and its first token block's
    row indices (read before the PDL wait: written before the step's first kernel; B zeros
    for the rows without an adapter) times y of each of its segment's token blocks pid_m,
    pid_m + programs, ..., plus the base columns, stored to out."""
    pid_m, pid_n, pid_ls = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, piece = pid_ls // NUM_SLICES, pid_ls % NUM_SLICES
    adapted = slot < NUM_SLOTS
    start = tl.load(seg_start_ptr + slot)
    length = tl.load(seg_len_ptr + slot)
    length = tl.where(adapted, length, num_tokens - start)  # padding rows too
    b, size, cols, col_ok, rs, r_ok = b_tile(
        b_ptr, slot, piece, length, adapted, slice_offset_ptr, slice_size_ptr, R,
        stride_bl, stride_bn, BLOCK_M, BLOCK_N, BLOCK_R, DOT_F32,
    )  # fmt: skip
    busy = (pid_m * BLOCK_M < length) & (pid_n * BLOCK_N < size)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the first block's rows, also before
    rows = tl.load(sorted_ptr + start + offs, mask=busy & (offs < length), other=0)
    pdl.wait(USE_PDL)
    if pid_m * BLOCK_M >= length or pid_n * BLOCK_N >= size:
        return
    y_col = N_out + (slot * NUM_SLICES + piece) * R  # this slot's slice's y in cat
    for m0 in range(pid_m * BLOCK_M, length, token_step):
        offs = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs < length
        if m0 != pid_m * BLOCK_M:  # the next block's rows
            rows = tl.load(sorted_ptr + start + offs, mask=row_ok, other=0)
        row_ptrs = cat_ptr + rows.to(tl.int64)[:, None] * stride_cm
        y = tl.load(row_ptrs + y_col + rs[None, :],  # [BLOCK_M, BLOCK_R]
                    mask=adapted & row_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
        if DOT_F32:
            delta = tl.dot(y.to(tl.float32), b, input_precision="ieee")
        else:
            delta = tl.dot(y.to(b.dtype), b)
        mask = row_ok[:, None] & col_ok[None, :]
        base = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N_out + cols[None, :]
        tl.store(out_ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=mask)


def expand_folded(
    stacked: torch.Tensor,
    lora_b: torch.Tensor,
    out_features: int,
    slice_offsets: torch.Tensor,
    slice_sizes: torch.Tensor,
    max_slice: int,
    rank: int,
    seg: LoRASegments,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """`[T, out_features]` (fresh, contiguous) from the folded GEMM's `stacked [T, out + L*S*R]`
    (module docstring); `seg` as `LoRABatch` fills it (the rows without an adapter after the
    last slot's); `config=None`: `expand_config` of the shape."""
    num_tokens = stacked.shape[0]
    slots = lora_b.shape[0]
    num_slices = slice_offsets.shape[0]
    if stacked.shape[1] != out_features + slots * num_slices * rank or stacked.stride(1) != 1:
        raise ValueError(f"folded product {tuple(stacked.shape)} is not [T, {out_features} + "
                         f"{slots} x {num_slices} x {rank}] with unit column stride")  # fmt: skip
    if num_tokens > seg.sorted_tokens.shape[0]:  # the no-adapter segment runs on to row T
        raise ValueError(f"{num_tokens} rows exceed the LoRA batch's {seg.sorted_tokens.shape}")
    out = torch.empty(num_tokens, out_features, dtype=stacked.dtype, device=stacked.device)
    if num_tokens == 0:
        return out
    config = config or expand_config(num_tokens, out_features, num_sms(out.device), slots)
    if config.block_m < DOT_ROWS:
        raise ValueError(f"ExpandConfig.block_m must be >= {DOT_ROWS} (tl.dot): {config}")
    block_n = min(config.block_n, max(16, triton.next_power_of_2(max_slice)))
    block_r = max(16, triton.next_power_of_2(rank))  # tl.dot needs K >= 16
    token_blocks = triton.cdiv(num_tokens, config.block_m)
    programs = min(token_blocks, config.token_programs or token_blocks)
    grid = (programs, triton.cdiv(max_slice, block_n), (slots + 1) * num_slices)
    flag = pdl.use_pdl(stacked)
    dot_f32 = lora_b.dtype == torch.float32 or interpreted()  # the interpreter: no half tl.dot
    _expand_folded_kernel[grid](
        stacked, lora_b, out, seg.sorted_tokens, seg.seg_start, seg.seg_len, slice_offsets,
        slice_sizes, num_tokens, programs * config.block_m, out_features, rank, stacked.stride(0),
        lora_b.stride(0), lora_b.stride(1), NUM_SLOTS=slots, NUM_SLICES=num_slices,
        BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT_F32=dot_f32,
        USE_PDL=flag, num_warps=config.num_warps, launch_pdl=flag,
    )  # fmt: skip
    return out
