"""Segmented multi-LoRA kernels (punica's shrink / expand idea, our own code).

One launch of each covers every token of the step, whatever adapter each uses: the grid's
third axis is the adapter slot, and a program takes a block of its slot's tokens
(`LoRASegments`: token indices grouped by slot), gathers their rows of x, and multiplies by
that slot's weights. Programs past the end of their slot's segment return at once, so the
grid can be sized by the step's token count alone (no host sync; inside a CUDA graph the
segment buffers are static and refilled each step). Tokens without an adapter are in no
segment: their rows of `out` are not touched.

- `shrink`: `y[t, :] = x[t] @ A[slot(t)]^T` (fp32 `[T, S * R]`, all slices at once).
- `expand`: `out[t, slice s] += y[t, s*R:(s+1)*R] @ B[slot(t), slice s]^T`; the grid's third
  axis is (slot, slice), so each program's tile reads one slice's rank columns. Every output
  element belongs to one token and one slice: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.lora.ops import LoRASegments

BLOCK_M = 16  # tokens per program (a decode step's tokens of one adapter: often fewer)


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["num_tokens"])
def _shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [L, N, K]
    y_ptr,  # fp32 [T, N]
    sorted_ptr,  # int32 [>= T]: token indices grouped by slot
    seg_start_ptr,  # int32 [L]
    seg_len_ptr,  # int32 [L]
    num_tokens,
    N,
    K,
    stride_xm,
    stride_al,
    stride_an,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_m, pid_n, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pdl.wait(USE_PDL)
    length = tl.load(seg_len_ptr + slot)
    if pid_m * BLOCK_M >= length:
        return
    start = tl.load(seg_start_ptr + slot)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs < length
    rows = tl.load(sorted_ptr + start + offs, mask=row_ok, other=0).to(tl.int64)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [BLOCK_M, BLOCK_K]
    a_ptrs = (  # [BLOCK_K, BLOCK_N]: the slot's A rows `cols`, transposed
        a_ptr + slot.to(tl.int64) * stride_al + cols[None, :].to(tl.int64) * stride_an
        + ks[:, None]
    )  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:  # fp32 weights, or the interpreter (no half tl.dot)
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def _expand_kernel(
    y_ptr,  # fp32 [T, S * R]
    b_ptr,  # [L, N_out, R]
    out_ptr,  # [T, N_out], updated in place
    sorted_ptr,
    seg_start_ptr,
    seg_len_ptr,
    slice_offset_ptr,  # int32 [S]
    slice_size_ptr,  # int32 [S]
    num_tokens,
    R,
    stride_ym,
    stride_bl,
    stride_bn,
    stride_om,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_m, pid_n, pid_ls = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, piece = pid_ls // NUM_SLICES, pid_ls % NUM_SLICES
    pdl.wait(USE_PDL)
    length = tl.load(seg_len_ptr + slot)
    size = tl.load(slice_size_ptr + piece)
    if pid_m * BLOCK_M >= length or pid_n * BLOCK_N >= size:
        return
    start = tl.load(seg_start_ptr + slot)
    offset = tl.load(slice_offset_ptr + piece)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs < length
    rows = tl.load(sorted_ptr + start + offs, mask=row_ok, other=0).to(tl.int64)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local < size
    cols = (offset + local).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    y = tl.load(  # [BLOCK_M, BLOCK_R]: this slice's rank columns
        y_ptr + rows[:, None] * stride_ym + piece * R + rs[None, :],
        mask=row_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    b = tl.load(  # [BLOCK_R, BLOCK_N]: the slot's B rows `cols`, transposed
        b_ptr + slot.to(tl.int64) * stride_bl + cols[None, :] * stride_bn + rs[:, None],
        mask=r_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        delta = tl.dot(y, b.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(y.to(b.dtype), b)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    old = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (old + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _dot_f32(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 or _interpreted()


def shrink(x: torch.Tensor, lora_a: torch.Tensor, y: torch.Tensor, seg: LoRASegments) -> None:
    """`y[t] = x[t] @ lora_a[slot(t)]^T` for the tokens in `seg` (x `[T, K]`, lora_a
    `[L, N, K]`, y fp32 `[T, N]`)."""
    num_tokens, k = x.shape
    slots, n, _ = lora_a.shape
    if num_tokens == 0:
        return
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    block_k = 32 if _interpreted() else 64
    grid = (triton.cdiv(num_tokens, BLOCK_M), triton.cdiv(n, block_n), slots)
    flag = pdl.use_pdl(x)
    _shrink_kernel[grid](
        x, lora_a, y, seg.sorted_tokens, seg.seg_start, seg.seg_len, num_tokens, n, k,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=_dot_f32(lora_a),
        USE_PDL=flag, launch_pdl=flag,
    )  # fmt: skip


def expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: torch.Tensor,
    slice_sizes: torch.Tensor,
    max_slice: int,
    rank: int,
    seg: LoRASegments,
) -> None:
    """`out[t, slice s] += y[t, s*R:(s+1)*R] @ lora_b[slot(t), slice s]^T` in place."""
    num_tokens = y.shape[0]
    slots = lora_b.shape[0]
    num_slices = slice_offsets.shape[0]
    if num_tokens == 0:
        return
    block_n = max(16, min(128, triton.next_power_of_2(max_slice)))
    block_r = max(16, triton.next_power_of_2(rank))  # tl.dot needs K >= 16
    grid = (triton.cdiv(num_tokens, BLOCK_M), triton.cdiv(max_slice, block_n), slots * num_slices)
    flag = pdl.use_pdl(y)
    _expand_kernel[grid](
        y, lora_b, out, seg.sorted_tokens, seg.seg_start, seg.seg_len, slice_offsets,
        slice_sizes, num_tokens, rank, y.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), NUM_SLICES=num_slices, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_R=block_r, DOT_F32=_dot_f32(lora_b), USE_PDL=flag, launch_pdl=flag,
    )  # fmt: skip
