"""Segmented multi-LoRA kernels (punica's shrink / expand idea, our own code).

One launch of each covers every token of the step, whatever adapter each uses: a grid axis is
the adapter slot, and a program takes a block of its slot's tokens (`LoRASegments`: token
indices grouped by slot), gathers their rows of x, and multiplies by that slot's weights.
Programs past the end of their slot's segment return at once, so the grid is sized by the
step's token count alone (no host sync; inside a CUDA graph the segment buffers are static and
refilled each step). Tokens without an adapter are in no segment: nothing of theirs is read or
written.

- `shrink`: `y[t, :] = x[t] @ A[slot(t)]^T` (fp32 `[T, S * R]`, all slices at once). A decode
  step's tokens are few and `S * R` is small, so the programs are spread over K (`split_plan` in
  launch_plan.py: enough K chunks for a few busy programs per SM): each reduces one chunk into
  fp32 partial sums, and the last chunk of a (token block, slot) to arrive (an arrival counter,
  as the split-K GEMV does) sums all chunks in a fixed order into y; one launch, deterministic,
  no zeroed buffer. Few tokens (`ShrinkConfig.fma_rows`) take a multiply-and-sum path with a
  token block of their padded count instead of `tl.dot`'s 16 rows. x may be a `DeferredNorm`
  (normalized as it loads) or `[gate | up]` (`silu_mul`: activated as it loads), rounded as the
  GEMV and `silu_and_mul` round, so the base layer keeps those folds.
- `expand`: `out[t, slice s] += y[t, s*R:(s+1)*R] @ B[slot(t), slice s]^T`; the grid's third
  axis is (slot, slice), and a program walks its slot's token blocks (`ExpandConfig`), keeping
  its B tile. Every output element belongs to one token and one slice: no atomics. A one-row
  GEMV adds the same term in its own epilogue instead (`layers.gemv_lora.LoRADelta`), before its
  residual add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv import num_sms
from polymodal.llm_core.layers.norm import DeferredNorm
from polymodal.llm_core.lora.launch_plan import (
    DOT_ROWS,
    ExpandConfig,
    ShrinkConfig,
    expand_config,
    interpreted,
    shrink_plan,
)
from polymodal.llm_core.lora.ops import LoRASegments

REDUCE_ELEMENTS = 32  # partial sums per thread in each load of the final split sum


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


@triton.jit
def _rows_times(acc, x, a, BLOCK_M: tl.constexpr):
    """acc[m, n] += sum over k of x[m, k] * a[k, n] by multiply-and-sum, row by row (fp32
    products of the inputs: exact for half inputs, as tl.dot's): few rows, no 16-row pad."""
    offs_m = tl.arange(0, BLOCK_M)
    xf = x.to(tl.float32)
    af = a.to(tl.float32)  # [BLOCK_K, BLOCK_N]
    for m in tl.static_range(BLOCK_M):
        x_m = tl.sum(tl.where(offs_m[:, None] == m, xf, 0.0), 0)  # [BLOCK_K]
        part = tl.sum(af * x_m[:, None], 0)  # [BLOCK_N]
        acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    return acc


@triton.jit
def _product(acc, x, a, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr):
    if USE_DOT:
        return _dot(acc, x, a, DOT_F32)
    return _rows_times(acc, x, a, BLOCK_M)


@triton.jit(do_not_specialize=["num_tokens", "splits"])
def _shrink_kernel(
    x_ptr,  # [T, K], or [T, 2K] = [gate | up] (SILU_MUL)
    a_ptr,  # [L, N, K]
    y_ptr,  # fp32 [T, N] out
    part_ptr,  # fp32 [splits, T, N]: one K chunk's sums per split (SPLIT)
    counter_ptr,  # int32 per (token block, slot, N block), zero between calls (SPLIT)
    sorted_ptr,  # int32 [>= T]: token indices grouped by slot
    seg_start_ptr,  # int32 [L]
    seg_len_ptr,  # int32 [L]
    norm_w_ptr,  # [K] RMSNorm weight (NORM)
    norm_sumsq_ptr,  # fp32 [T, norm_parts]: x's sums of squares per block of its producer (NORM)
    norm_parts,
    eps,
    num_tokens,
    splits,
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
    REDUCE_S: tl.constexpr,  # splits summed per load of the final sum
    SPLIT: tl.constexpr,  # splits > 1
    USE_DOT: tl.constexpr,  # tl.dot (BLOCK_M >= 16), else `_rows_times`
    SILU_MUL: tl.constexpr,
    NORM: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (split x N block, token block, slot). The segment lengths (copied in before the
    step's first kernel) and A (written between steps) are read before the PDL wait: the first
    A tile streams in while the kernel before ends. With SPLIT, each program stores its chunk's
    sums and the last of its tile's splits to arrive sums them all (split order) into y and
    resets the counter; the others end there."""
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
        p_ok = row_ok[:, None] & (offs_p[None, :] < norm_parts)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.load(parts, mask=p_ok, other=0.0), 1) / K + eps)
    x = _load_x(x_ptr, rows, row_ok, k, k < k_end, K, stride_xm, rstd, norm_w_ptr,
                SILU_MUL, NORM)  # fmt: skip
    acc = _product(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x, a, USE_DOT, DOT_F32, BLOCK_M)
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_end
        a = tl.load(a_rows + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        x = _load_x(x_ptr, rows, row_ok, k, k_ok, K, stride_xm, rstd, norm_w_ptr,
                    SILU_MUL, NORM)  # fmt: skip
        acc = _product(acc, x, a, USE_DOT, DOT_F32, BLOCK_M)
    tile = rows[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N] offsets into [T, N]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        plane = num_tokens.to(tl.int64) * N
        tl.store(part_ptr + split * plane + tile, acc, mask=tile_ok)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        counter = counter_ptr + (pid_m * tl.num_programs(2) + slot) * n_blocks + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:  # the last split: sum all (fixed order), reset the counter
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            ss = tl.arange(0, REDUCE_S)
            for s0 in range(0, splits, REDUCE_S):
                s = s0 + ss
                ptrs = part_ptr + s.to(tl.int64)[:, None, None] * plane + tile[None, :, :]
                s_ok = (s < splits)[:, None, None] & tile_ok[None, :, :]
                acc += tl.sum(tl.load(ptrs, mask=s_ok, other=0.0, cache_modifier=".cg"), 0)
            tl.store(y_ptr + tile, acc, mask=tile_ok)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(y_ptr + tile, acc, mask=tile_ok)


@triton.jit
def b_tile(b_ptr, slot, piece, length, adapted, slice_offset_ptr, slice_size_ptr, R,
           stride_bl, stride_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """An expand program's `[BLOCK_R, BLOCK_N]` tile of the slot's B rows for its slice's
    N block (transposed; zeros where the program has no work or the slot no adapter), with
    the slice's size, the tile's output columns and masks: (b, size, cols, col_ok, rs, r_ok)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    size = tl.load(slice_size_ptr + piece)
    busy = (pid_m * BLOCK_M < length) & (pid_n * BLOCK_N < size)
    offset = tl.load(slice_offset_ptr + piece)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local < size
    cols = (offset + local).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bl + cols[None, :] * stride_bn + rs[:, None],
        mask=busy & adapted & r_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        b = b.to(tl.float32)
    return b, size, cols, col_ok, rs, r_ok


@triton.jit(do_not_specialize=["token_step"])
def _expand_kernel(
    y_ptr,  # fp32 [T, S * R]
    b_ptr,  # [L, N_out, R]
    out_ptr,  # [T, N_out], updated in place
    sorted_ptr,
    seg_start_ptr,
    seg_len_ptr,
    slice_offset_ptr,  # int32 [S]
    slice_size_ptr,  # int32 [S]
    token_step,  # tokens between a program's blocks: BLOCK_M x programs along the tokens
    R,
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
    """Program (token program, N block, slot x slice): its B tile (read before the PDL wait)
    times y of each of its slot's token blocks pid_m, pid_m + programs, ..., added to out."""
    pid_m, pid_n, pid_ls = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot, piece = pid_ls // NUM_SLICES, pid_ls % NUM_SLICES
    length = tl.load(seg_len_ptr + slot)
    b, size, cols, col_ok, rs, r_ok = b_tile(
        b_ptr, slot, piece, length, length > 0, slice_offset_ptr, slice_size_ptr, R,
        stride_bl, stride_bn, BLOCK_M, BLOCK_N, BLOCK_R, DOT_F32,
    )  # fmt: skip
    pdl.wait(USE_PDL)
    if pid_m * BLOCK_M >= length or pid_n * BLOCK_N >= size:
        return
    start = tl.load(seg_start_ptr + slot)
    width = NUM_SLICES * R
    for m0 in range(pid_m * BLOCK_M, length, token_step):
        offs = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs < length
        rows = tl.load(sorted_ptr + start + offs, mask=row_ok, other=0).to(tl.int64)
        y_ptrs = y_ptr + rows[:, None] * width + piece * R + rs[None, :]  # this slice's ranks
        y = tl.load(y_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, R]
        if DOT_F32:
            delta = tl.dot(y, b, input_precision="ieee")
        else:
            delta = tl.dot(y.to(b.dtype), b)
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        old = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (old + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _dot_f32(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 or interpreted()


def shrink(x, lora_a: torch.Tensor, seg: LoRASegments, silu_mul: bool = False,
           config: ShrinkConfig | None = None) -> torch.Tensor:  # fmt: skip
    """`y [T, N]` fp32 `= x[t] @ lora_a[slot(t)]^T` for the tokens in `seg` (rows of other
    tokens are left unwritten). `x [T, K]`, or `[T, 2K]` = `[gate | up]` with `silu_mul`, or a
    `DeferredNorm` of `[T, K]`; `lora_a [L, N, K]`."""
    config = config or ShrinkConfig()
    norm = x if isinstance(x, DeferredNorm) else None
    x = norm.h if norm is not None else x
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_tokens = x.shape[0]
    slots, n, k = lora_a.shape
    y = torch.empty(num_tokens, n, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return y
    block_m, block_n, block_k, chunk, splits = shrink_plan(num_tokens, n, k, num_sms(x.device),
                                                           config)  # fmt: skip
    m_blocks, n_blocks = triton.cdiv(num_tokens, block_m), triton.cdiv(n, block_n)
    part, counters = y, y  # unread with one split
    if splits > 1:
        part = torch.empty(splits, num_tokens, n, dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, m_blocks * slots * n_blocks)
    # the final sum loads REDUCE_S splits of the tile at once, REDUCE_ELEMENTS a thread
    budget = REDUCE_ELEMENTS * 32 * config.num_warps // (block_m * block_n)
    reduce_s = max(1, min(triton.next_power_of_2(splits), triton.next_power_of_2(budget + 1) // 2))
    norm_w, norm_sumsq, eps, parts = lora_a, y, 0.0, 1  # unread without a norm
    if norm is not None:
        norm_w, norm_sumsq, eps, parts = norm.weight, norm.sumsq, norm.eps, norm.sumsq.shape[1]
    grid = (splits * n_blocks, m_blocks, slots)
    flag = pdl.use_pdl(x)
    _shrink_kernel[grid](
        x, lora_a, y, part, counters, seg.sorted_tokens, seg.seg_start, seg.seg_len, norm_w,
        norm_sumsq, parts, eps, num_tokens, splits, n, k, chunk, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_P=triton.next_power_of_2(parts), REDUCE_S=reduce_s, SPLIT=splits > 1,
        USE_DOT=block_m >= DOT_ROWS, SILU_MUL=silu_mul, NORM=norm is not None,
        DOT_F32=_dot_f32(lora_a), USE_PDL=flag, num_warps=config.num_warps, launch_pdl=flag,
    )  # fmt: skip
    return y


def expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: torch.Tensor,
    slice_sizes: torch.Tensor,
    max_slice: int,
    rank: int,
    seg: LoRASegments,
    config: ExpandConfig | None = None,
) -> None:
    """`out[t, slice s] += y[t, s*R:(s+1)*R] @ lora_b[slot(t), slice s]^T` in place (`y`:
    `shrink`'s `[T, S * R]`); `config=None`: `expand_config` of the shape."""
    num_tokens = y.shape[0]
    slots = lora_b.shape[0]
    num_slices = slice_offsets.shape[0]
    if num_tokens == 0:
        return
    config = config or expand_config(num_tokens, out.shape[1], num_sms(out.device), slots)
    if config.block_m < DOT_ROWS:
        raise ValueError(f"ExpandConfig.block_m must be >= {DOT_ROWS} (tl.dot): {config}")
    block_n = min(config.block_n, max(16, triton.next_power_of_2(max_slice)))
    block_r = max(16, triton.next_power_of_2(rank))  # tl.dot needs K >= 16
    token_blocks = triton.cdiv(num_tokens, config.block_m)
    programs = min(token_blocks, config.token_programs or token_blocks)
    grid = (programs, triton.cdiv(max_slice, block_n), slots * num_slices)
    flag = pdl.use_pdl(y)
    _expand_kernel[grid](
        y, lora_b, out, seg.sorted_tokens, seg.seg_start, seg.seg_len, slice_offsets,
        slice_sizes, programs * config.block_m, rank, lora_b.stride(0), lora_b.stride(1),
        out.stride(0), NUM_SLICES=num_slices, BLOCK_M=config.block_m, BLOCK_N=block_n,
        BLOCK_R=block_r, DOT_F32=_dot_f32(lora_b), USE_PDL=flag, num_warps=config.num_warps,
        launch_pdl=flag,
    )  # fmt: skip
