"""Segmented multi-LoRA kernels (punica's shrink / expand idea, our own code).

One launch of each covers every token of the step, whatever adapter each uses: a grid axis is
the adapter slot, and a program takes a block of its slot's tokens (`LoRASegments`: token
indices grouped by slot), gathers their rows of x, and multiplies by that slot's weights.
Programs past the end of their slot's segment return at once, so the grid is sized by the
step's token count alone (no host sync; inside a CUDA graph the segment buffers are static and
refilled each step). Tokens without an adapter are in no segment: nothing of theirs is read or
written.

- `shrink`, split-K: `part[c, t, :] = x[t, chunk c] @ A[slot(t), :, chunk c]^T` (fp32
  `[splits, T, S * R]`, all slices at once). A decode step's tokens are few and `S * R` is
  small, so the programs are spread over K: each reduces one chunk of K (`split_plan`) and
  stores its own partial sums; no atomics, no zeroed buffer. x may be a `DeferredNorm`
  (normalized as it loads) or `[gate | up]` (`silu_mul`: activated as it loads), rounded as
  the GEMV and `silu_and_mul` round, so the base layer keeps those folds.
- `expand`: `out[t, slice s] += (sum over c of part[c, t, s*R:(s+1)*R]) @ B[slot(t), slice s]^T`
  (the splits summed as y loads); the grid's third axis is (slot, slice). Every output
  element belongs to one token and one slice: no atomics. A one-row GEMV adds the same term
  in its own epilogue instead (`layers.gemv.LoRADelta`), before its residual add.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.layers.norm import DeferredNorm
from polymodal.llm_core.lora.ops import LoRASegments

BLOCK_M = 16  # tokens per program (a decode step's tokens of one adapter: often fewer)
MAX_SPLITS = 32  # K chunks of a shrink at most (each expand program sums all of them)
MIN_TILES = 2  # A tiles per K chunk at least


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of `shrink` (`scripts/bench_lora.py --kernels` sweeps them)."""

    block_k: int = 128  # A tile width
    min_tiles: int = MIN_TILES  # A tiles per K chunk at least
    num_warps: int = 4


def split_plan(k: int, config: ShrinkConfig | None = None) -> tuple[int, int, int]:
    """`(block_k, chunk, splits)` of a shrink over `k` input features: A tiles of `block_k`,
    `chunk` (a multiple of it) per program, `splits = cdiv(k, chunk)` programs per token block.
    Chunks of >= `min_tiles` tiles, at most MAX_SPLITS of them: Qwen2.5-VL-7B's K = 3584 is
    14 chunks of 256, K = 18944 (down_proj) 30 of 640 by default. The interpreter takes 32-wide
    tiles, one per chunk, so small test shapes split too."""
    config = config or ShrinkConfig()
    block_k, min_tiles = (32, 1) if _interpreted() else (config.block_k, config.min_tiles)
    tiles = max(1, triton.cdiv(k, block_k))
    per_split = max(min_tiles, triton.cdiv(tiles, MAX_SPLITS))
    return block_k, per_split * block_k, triton.cdiv(tiles, per_split)


@triton.jit
def _load_x(x_ptr, rows, row_ok, k, k_ok, K, stride_xm, rstd, norm_w_ptr,
            SILU_MUL: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """x[rows, k] `[BLOCK_M, BLOCK_K]` as the layer sees it: SILU_MUL: rows are `[gate | up]`
    (2K wide), x = silu(gate) * up rounded to the input dtype; NORM: RMS-normalized with each
    row's `rstd` and the norm weight, rounded as `rms_norm` rounds (both as layers/gemv.py)."""
    ptrs = x_ptr + rows[:, None] * stride_xm + k[None, :]
    mask = row_ok[:, None] & k_ok[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    if NORM:
        wn = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        h = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        x = (wn[None, :] * h.to(tl.float32)).to(h.dtype)
    return x


@triton.jit
def _dot(acc, x, a, DOT_F32: tl.constexpr):
    if DOT_F32:  # fp32 weights, or the interpreter (no half tl.dot)
        return tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, a.to(x.dtype), acc)


@triton.jit(do_not_specialize=["num_tokens"])
def _shrink_kernel(
    x_ptr,  # [T, K], or [T, 2K] = [gate | up] (SILU_MUL)
    a_ptr,  # [L, N, K]
    part_ptr,  # fp32 [splits, T, N] out: one K chunk's sums per split
    sorted_ptr,  # int32 [>= T]: token indices grouped by slot
    seg_start_ptr,  # int32 [L]
    seg_len_ptr,  # int32 [L]
    norm_w_ptr,  # [K] RMSNorm weight (NORM)
    norm_sumsq_ptr,  # fp32 [T, norm_parts]: x's sums of squares per block of its producer (NORM)
    norm_parts,
    eps,
    num_tokens,
    N,
    K,
    chunk,  # K elements per split, a multiple of BLOCK_K
    stride_xm,
    stride_al,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # norm_parts padded to a power of 2
    SILU_MUL: tl.constexpr,
    NORM: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (split x N block, token block, slot). The segment lengths (copied in before the
    step's first kernel) and A (written between steps) are read before the PDL wait: the first
    A tile streams in while the kernel before ends."""
    pid, pid_m, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_blocks = tl.cdiv(N, BLOCK_N)
    split, pid_n = pid // n_blocks, pid % n_blocks
    length = tl.load(seg_len_ptr + slot)
    busy = pid_m * BLOCK_M < length
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_begin = split * chunk
    k_end = tl.minimum(k_begin + chunk, K)
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + slot.to(tl.int64) * stride_al + cols[None, :].to(tl.int64) * stride_an
    k = k_begin + ks
    first = busy & (k < k_end)[:, None] & col_ok[None, :]
    a = tl.load(a_rows + k[:, None], mask=first, other=0.0)  # [BLOCK_K, BLOCK_N]: A^T's tile
    pdl.wait(USE_PDL)
    if pid_m * BLOCK_M >= length:
        return
    start = tl.load(seg_start_ptr + slot)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs < length
    rows = tl.load(sorted_ptr + start + offs, mask=row_ok, other=0).to(tl.int64)  # [BLOCK_M]
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM:  # each row's 1/rms from its producer's per-block sums of squares, in fixed order
        offs_p = tl.arange(0, BLOCK_P)
        parts = norm_sumsq_ptr + rows[:, None] * norm_parts + offs_p[None, :]
        mask = row_ok[:, None] & (offs_p[None, :] < norm_parts)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.load(parts, mask=mask, other=0.0), 1) / K + eps)
    x = _load_x(x_ptr, rows, row_ok, k, k < k_end, K, stride_xm, rstd, norm_w_ptr,
                SILU_MUL, NORM)  # fmt: skip
    acc = _dot(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x, a, DOT_F32)
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_end
        a = tl.load(a_rows + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        x = _load_x(x_ptr, rows, row_ok, k, k_ok, K, stride_xm, rstd, norm_w_ptr,
                    SILU_MUL, NORM)  # fmt: skip
        acc = _dot(acc, x, a, DOT_F32)
    part = part_ptr + split.to(tl.int64) * num_tokens * N + rows[:, None] * N + cols[None, :]
    tl.store(part, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def _expand_kernel(
    part_ptr,  # fp32 [splits, T, S * R]
    b_ptr,  # [L, N_out, R]
    out_ptr,  # [T, N_out], updated in place
    sorted_ptr,
    seg_start_ptr,
    seg_len_ptr,
    slice_offset_ptr,  # int32 [S]
    slice_size_ptr,  # int32 [S]
    num_tokens,
    splits,
    R,
    stride_bl,
    stride_bn,
    stride_om,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits padded to a power of 2
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (token block, N block, slot x slice); B is read before the PDL wait."""
    pid_m, pid_n, pid_ls = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, piece = pid_ls // NUM_SLICES, pid_ls % NUM_SLICES
    length = tl.load(seg_len_ptr + slot)
    size = tl.load(slice_size_ptr + piece)
    busy = (pid_m * BLOCK_M < length) & (pid_n * BLOCK_N < size)
    offset = tl.load(slice_offset_ptr + piece)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local < size
    cols = (offset + local).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    b = tl.load(  # [BLOCK_R, BLOCK_N]: the slot's B rows `cols`, transposed
        b_ptr + slot.to(tl.int64) * stride_bl + cols[None, :] * stride_bn + rs[:, None],
        mask=busy & r_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    pdl.wait(USE_PDL)
    if pid_m * BLOCK_M >= length or pid_n * BLOCK_N >= size:
        return
    start = tl.load(seg_start_ptr + slot)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs < length
    rows = tl.load(sorted_ptr + start + offs, mask=row_ok, other=0).to(tl.int64)
    # y [BLOCK_M, BLOCK_R]: this slice's rank columns, every K split in one load, summed
    width = NUM_SLICES * R
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    y_ptrs = (part_ptr + s[:, None, None] * num_tokens * width + rows[None, :, None] * width
              + piece * R + rs[None, None, :])  # fmt: skip
    y_mask = (s < splits)[:, None, None] & row_ok[None, :, None] & r_ok[None, None, :]
    y = tl.sum(tl.load(y_ptrs, mask=y_mask, other=0.0), 0)
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


def shrink(x, lora_a: torch.Tensor, seg: LoRASegments, silu_mul: bool = False,
           config: ShrinkConfig | None = None) -> torch.Tensor:  # fmt: skip
    """Split-K partial sums `part [splits, T, N]` fp32 of `x[t] @ lora_a[slot(t)]^T` for the
    tokens in `seg` (rows of other tokens are left unwritten). `x [T, K]`, or `[T, 2K]` =
    `[gate | up]` with `silu_mul`, or a `DeferredNorm` of `[T, K]`; `lora_a [L, N, K]`."""
    config = config or ShrinkConfig()
    norm = x if isinstance(x, DeferredNorm) else None
    x = norm.h if norm is not None else x
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_tokens = x.shape[0]
    slots, n, k = lora_a.shape
    block_k, chunk, splits = split_plan(k, config)
    part = torch.empty(splits, num_tokens, n, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return part
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    norm_w, norm_sumsq, eps, parts = lora_a, part, 0.0, 1  # unread without a norm
    if norm is not None:
        norm_w, norm_sumsq, eps, parts = norm.weight, norm.sumsq, norm.eps, norm.sumsq.shape[1]
    grid = (splits * triton.cdiv(n, block_n), triton.cdiv(num_tokens, BLOCK_M), slots)
    flag = pdl.use_pdl(x)
    _shrink_kernel[grid](
        x, lora_a, part, seg.sorted_tokens, seg.seg_start, seg.seg_len, norm_w, norm_sumsq,
        parts, eps, num_tokens, n, k, chunk, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_P=triton.next_power_of_2(parts),
        SILU_MUL=silu_mul, NORM=norm is not None, DOT_F32=_dot_f32(lora_a), USE_PDL=flag,
        num_warps=config.num_warps, launch_pdl=flag,
    )  # fmt: skip
    return part


def expand(
    part: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: torch.Tensor,
    slice_sizes: torch.Tensor,
    max_slice: int,
    rank: int,
    seg: LoRASegments,
) -> None:
    """`out[t, slice s] += y[t, s*R:(s+1)*R] @ lora_b[slot(t), slice s]^T` in place, with
    `y = part.sum(0)` (`shrink`'s split-K partial sums, `[splits, T, S * R]`)."""
    splits, num_tokens, _ = part.shape
    slots = lora_b.shape[0]
    num_slices = slice_offsets.shape[0]
    if splits > MAX_SPLITS:  # one load sums them all
        raise ValueError(f"expand takes at most {MAX_SPLITS} K splits, got {splits}")
    if num_tokens == 0:
        return
    block_n = max(16, min(128, triton.next_power_of_2(max_slice)))
    block_r = max(16, triton.next_power_of_2(rank))  # tl.dot needs K >= 16
    grid = (triton.cdiv(num_tokens, BLOCK_M), triton.cdiv(max_slice, block_n), slots * num_slices)
    flag = pdl.use_pdl(part)
    _expand_kernel[grid](
        part, lora_b, out, seg.sorted_tokens, seg.seg_start, seg.seg_len, slice_offsets,
        slice_sizes, num_tokens, splits, rank, lora_b.stride(0), lora_b.stride(1),
        out.stride(0), NUM_SLICES=num_slices, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_R=block_r, BLOCK_S=triton.next_power_of_2(splits),
        DOT_F32=_dot_f32(lora_b), USE_PDL=flag, launch_pdl=flag,
    )  # fmt: skip
