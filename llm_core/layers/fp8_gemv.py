"""The FP8 GEMV: a few rows of 16-bit x times an E4M3 weight (per-channel or 128x128 block
scales, as `fp8_kernels.py`), x quantized per row inside the kernel.

`fp8_gemv` (batch-1 decode, one launch): a program owns `BLOCK_N` (64) weight rows and
streams them along K (FP8: half the bytes of the 16-bit GEMV), each `[BLOCK_N, BLOCK_K]` tile
as loaded (cp.async, pipelined) into an E4M3 dot with x's tile, fp32 accumulation: wgmma
(QGMMA) on sm_90, ~1 instruction a weight byte, where the fp32-converting kernel took 6.
x is quantized in the kernel as `quantize_rows` does (same scales and E4M3 rounding: per
row from a first pass over the whole row; blockwise per 128-feature group) and padded with
zeros to the dot's 16 columns: column m is x's row m, or, for one row of block weights, the
tile's group m (BLOCK_K up to 16 groups, each its own x and weight scale; the columns are
summed at the end). One row's tile is loaded a tile ahead, quantized once and padded with
`tl.where`. Split-K: the last split to arrive sums the splits' fp32 partials in order.
The first weight tile loads before the PDL wait, as the 16-bit GEMV's (H200 FP8 decode 327.1
-> 337.2 tokens/s): it streams in while the previous kernel ends and x's scale pass runs.
Under the interpreter (no FP8 dot) the dots run in fp32 on the same E4M3 values.
At one row it takes the 16-bit GEMV's folds (`gemv.gemv`): a deferred RMSNorm or SiLU*mul
applied to x as it loads (the amax pass sees x as folded), the residual add in the epilogue.
Launch parameters derive from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.layers.fp8_kernels import FP8_MAX, MIN_SCALE, quantize_e4m3
from polymodal.llm_core.layers.gemv import (
    num_sms,
    split_workspace,
)
from polymodal.llm_core.layers.gemv_folds import load_x_folded, norm_args, one_row_rstd
from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

XROWS = tl.constexpr(16)  # the FP8 GEMV's dot columns (x rows or groups): a dot's minimum
GEMV_MAX_ROWS = 8
# x features a load in the FP8 GEMV's amax pass (32 a thread at 4 warps): K = 18944 (a 7B's
# down_proj) in 5 loads, not 37 of BLOCK_K
AMAX_BLOCK = 4096


@triton.jit
def _row_scale(row_ptr, K, valid, norm_w_ptr, rstd, AMAX_BLOCK: tl.constexpr,
               SILU_MUL: tl.constexpr = False, NORM: tl.constexpr = False):  # fmt: skip
    """One x row's scale from its amax over all K (`AMAX_BLOCK` features a load, so that the
    weights start streaming after a few loads, not K / BLOCK_K dependent ones), of x as the
    folds make it (`gemv_folds.load_x_folded`)."""
    offs = tl.arange(0, AMAX_BLOCK)
    amax = tl.zeros((AMAX_BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, AMAX_BLOCK):
        mask = (k0 + offs < K) & valid
        x = load_x_folded(row_ptr, k0 + offs, mask, K, norm_w_ptr, rstd, SILU_MUL, NORM)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    return tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)


@triton.jit
def _dot(w, xq, acc, DOT_F32: tl.constexpr):
    """acc + w @ xq^T in fp32: `[BLOCK_N, BLOCK_K] x [BLOCK_K, 16]`, E4M3 x E4M3 (wgmma on
    sm_90), or in fp32 where there is no FP8 dot (the interpreter)."""
    if DOT_F32:
        acc = tl.dot(w.to(tl.float32), tl.trans(xq.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, tl.trans(xq), acc)
    return acc


@triton.jit
def _tile_step(acc, w, tile, x_next, x_scale, x_ptr, sw_row, w_kblocks, norm_w_ptr, rstd, M, K,
               stride_xm, last, cols, offs_k, BLOCKWISE: tl.constexpr, SILU_MUL: tl.constexpr,
               NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """One K tile of `_fp8_gemv_kernel`: x's tile quantized (one row: `x_next`, and the tile
    after it loaded for the next step) and padded, its E4M3 dot with the weight tile `w`, the
    scales applied (blockwise) or left to the end (per channel); returns (acc, x_next)."""
    k = tile * BLOCK_K + offs_k
    k_mask = (k < K) | EVEN_K
    if BLOCK_M == 1:  # quantize the one row, then pad: not 16-row loads and converts
        x = x_next.to(tl.float32)
        kx = tl.minimum(tile + 1, last) * BLOCK_K + offs_k[None, :]
        x_next = load_x_folded(x_ptr, kx, (kx < K) | EVEN_K, K, norm_w_ptr, rstd, SILU_MUL,
                               NORM)  # fmt: skip
        if BLOCKWISE:  # [G, GROUP]: each group's scale, group g to the dot's column g
            xg = tl.reshape(x, (BLOCK_K // GROUP, GROUP))
            x_scale = tl.maximum(tl.max(tl.abs(xg), 1) / FP8_MAX, MIN_SCALE)  # [G]
            xq = tl.reshape(quantize_e4m3(xg, x_scale[:, None]).to(tl.float8e4nv), (1, BLOCK_K))
            col = offs_k // GROUP
        else:
            xq = quantize_e4m3(x, x_scale).to(tl.float8e4nv)
            col = tl.zeros_like(offs_k)
        xq = tl.where(cols[:, None] == col[None, :], xq, tl.zeros_like(xq))  # [16, BLOCK_K]
    else:
        x = tl.load(x_ptr + cols[:, None] * stride_xm + k[None, :],
                    mask=(cols[:, None] < M) & k_mask[None, :], other=0.0)  # fmt: skip
        x = x.to(tl.float32)  # [16, BLOCK_K]
        if BLOCKWISE:  # BLOCK_K = GROUP
            x_scale = tl.maximum(tl.max(tl.abs(x), 1) / FP8_MAX, MIN_SCALE)
        xq = quantize_e4m3(x, x_scale[:, None]).to(tl.float8e4nv)
    if BLOCKWISE:
        part = _dot(w, xq, tl.zeros_like(acc), DOT_F32)
        if BLOCK_M == 1:  # column g's scale: group g's x scale times its weight scale
            g = tl.arange(0, BLOCK_K // GROUP)
            kb = tile * (BLOCK_K // GROUP) + g
            sw = tl.load(sw_row + kb, mask=(kb < w_kblocks) | EVEN_K, other=0.0)
            scale = tl.where(cols[:, None] == g[None, :], (sw * x_scale)[None, :], 0.0)
            acc += part * tl.sum(scale, 1)[None, :]
        else:
            acc += part * (tl.load(sw_row + tile) * x_scale[None, :])
    else:  # the wgmma accumulates in place
        acc = _dot(w, xq, acc, DOT_F32)
    return acc, x_next


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
    res_ptr, sumsq_ptr, norm_w_ptr, norm_sumsq_ptr, norm_parts, eps,
    M, N, K, stride_xm, w_kblocks, tiles_per_split,
    BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    SILU_MUL: tl.constexpr, NORM: tl.constexpr, BLOCK_P: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, AMAX_BLOCK: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    """Program (n block, k split): out[m, f] = sum_k q(x[m, k]) * w[f, k] * scales. A K tile
    is one E4M3 dot of the weight tile as loaded and x's quantized tile padded with zeros to
    the dot's 16 columns: column m is x's row m, or (blockwise, one row) the tile's `GROUP`-
    feature group m, each with its own x and weight scale (summed over columns at the end).
    Per channel, x's scale comes from a first pass over the whole row and all scales apply
    once, at the end; blockwise, each group's on each tile's product. One row only: x may be
    activated (SILU_MUL) or normalized (NORM) as it loads, and RESIDUAL adds `res` to the
    output and writes its sum of squares over this feature block to `sumsq[0, pid_n]`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, XROWS)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    # rows past N read row N - 1: no mask, 16-byte copies (their sums are never stored)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * K
    sw_row = w_scale_ptr + (pid_n * BLOCK_N // GROUP) * w_kblocks  # BLOCK_N divides GROUP
    acc = tl.zeros((BLOCK_N, XROWS), dtype=tl.float32)
    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    last = tl.maximum(tile_end - 1, 0)  # where one row's x prefetch stops
    # the first weight tile before the PDL wait (nothing earlier writes weights): it streams in
    # while the previous kernel ends and x's scale pass runs (a split without tiles reads one)
    k = tl.minimum(tile_start, last) * BLOCK_K + offs_k
    w_first = tl.load(w_rows + k[None, :], mask=((k < K) | EVEN_K)[None, :], other=0.0,
                      eviction_policy="evict_first")  # fmt: skip
    pdl.wait(USE_PDL)
    rstd = one_row_rstd(norm_sumsq_ptr, norm_parts, eps, 0, M, K, NORM, BLOCK_P)
    x_scale = tl.full((XROWS,), MIN_SCALE, tl.float32)  # padded rows: never NaN
    if not BLOCKWISE:  # every program reads all of x (small) for its rows' scales
        if BLOCK_M == 1:
            x_scale = _row_scale(x_ptr, K, True, norm_w_ptr, rstd, AMAX_BLOCK, SILU_MUL, NORM)
        else:
            for m in tl.static_range(BLOCK_M):
                scale = _row_scale(x_ptr + m * stride_xm, K, m < M, x_ptr, 0.0, AMAX_BLOCK)
                x_scale = tl.where(cols == m, scale, x_scale)
    x_next = tl.zeros((1, BLOCK_K), dtype=x_ptr.dtype.element_ty)  # one row's next x tile
    if BLOCK_M == 1:  # one row: its tile loaded one iteration ahead, in registers
        kx = tl.minimum(tile_start, last) * BLOCK_K + offs_k[None, :]
        x_next = load_x_folded(x_ptr, kx, (kx < K) | EVEN_K, K, norm_w_ptr, rstd, SILU_MUL,
                               NORM)  # [1, BLOCK_K]  # fmt: skip
    if tile_start < tile_end:
        acc, x_next = _tile_step(acc, w_first, tile_start, x_next, x_scale, x_ptr, sw_row,
                                 w_kblocks, norm_w_ptr, rstd, M, K, stride_xm, last, cols,
                                 offs_k, BLOCKWISE, SILU_MUL, NORM, BLOCK_M, BLOCK_K, GROUP,
                                 EVEN_K, DOT_F32)  # fmt: skip
    for tile in range(tile_start + 1, tile_end):
        k = tile * BLOCK_K + offs_k
        w = tl.load(w_rows + k[None, :], mask=((k < K) | EVEN_K)[None, :], other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K] E4M3  # fmt: skip
        acc, x_next = _tile_step(acc, w, tile, x_next, x_scale, x_ptr, sw_row, w_kblocks,
                                 norm_w_ptr, rstd, M, K, stride_xm, last, cols, offs_k,
                                 BLOCKWISE, SILU_MUL, NORM, BLOCK_M, BLOCK_K, GROUP, EVEN_K,
                                 DOT_F32)  # fmt: skip
    if not BLOCKWISE:
        sw = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc * sw[:, None] * (x_scale if BLOCK_M == 1 else x_scale[None, :])
    elif BLOCK_M == 1:  # the groups' columns summed: x's one row
        acc = tl.where(cols[None, :] == 0, tl.sum(acc, 1)[:, None], 0.0)
    out_offs = cols[None, :] * N + offs_n[:, None]
    out_mask = (cols[None, :] < M) & n_mask[:, None]
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split sums all of them in split order
            acc = tl.zeros((BLOCK_N, XROWS), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + sk * M * N + out_offs, mask=out_mask, other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            _store(acc, b_ptr, out_ptr, res_ptr, sumsq_ptr, offs_n, n_mask, out_offs, out_mask,
                   pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _store(acc, b_ptr, out_ptr, res_ptr, sumsq_ptr, offs_n, n_mask, out_offs, out_mask,
               pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip


@triton.jit
def _store(acc, b_ptr, out_ptr, res_ptr, sumsq_ptr, offs_n, n_mask, out_offs, out_mask, pid_n,
           HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
    """out = acc (+ bias) in out's dtype; RESIDUAL (one row): plus the residual row, rounded as
    torch's add rounds, and the block's sum of squares of the result to `sumsq[0, pid_n]`."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        r = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(out_ptr.dtype.element_ty)
        h = tl.where(out_mask, y.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + pid_n, tl.sum(tl.sum(h * h, 1), 0))
    tl.store(out_ptr + out_offs, y, mask=out_mask)


def gemv_config(m: int, n: int, k: int, blockwise: bool, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps): 64 weight rows (one warpgroup's wgmma M) x 256
    FP8 bytes a tile (512 for long per-channel rows; block weights: two 128-feature groups for
    one row where K allows, else one), K split until the programs cover the SMs once (each
    split >= 4 tiles). From the H200 sweep at a 7B's shapes (scripts/bench_quant_kernels.py,
    docs/performance.md fourteenth session): within 7% of the best config at each shape but
    block-wise gate_up (9%)."""
    if blockwise:
        block_k = 256 if m == 1 and k % 256 == 0 else 128
    else:
        block_k = 512 if k >= 8192 else min(256, max(64, triton.next_power_of_2(k)))
    block_n = 64
    tiles = triton.cdiv(k, block_k)
    split_k = 1
    while split_k < 16 and triton.cdiv(n, block_n) * split_k < sms and tiles >= 4 * split_k:
        split_k *= 2
    return block_n, block_k, split_k, 4


def fp8_gemv(x, weight, w_scale, block: int | None = None, bias=None, config=None,
             silu_mul: bool = False, residual: torch.Tensor | None = None):  # fmt: skip
    """`x [M <= 8, K]` (16-bit) times the FP8 `weight [N, K]` (scales as `fp8_gemm`). `config`:
    (BLOCK_N, BLOCK_K, SPLIT_K[, num_warps[, num_stages]]), each >= 16 (a dot's minimum;
    wgmma's M is 64 a warpgroup). Block weights: BLOCK_N divides the block, BLOCK_K is the
    block (one row: up to 16 blocks). One row takes the 16-bit GEMV's folds (`gemv.gemv`): x
    may be a `DeferredNorm`, `silu_mul` takes x as `[gate | up]`, and `residual` makes it
    return `AddedResidual(out + residual, sums of squares)`."""
    norm = x if isinstance(x, DeferredNorm) else None
    x = norm.h if norm is not None else x
    m, width = x.shape
    k = width // 2 if silu_mul else width
    n = weight.shape[0]
    if m > GEMV_MAX_ROWS or weight.shape[1] != k or width % (1 + silu_mul):
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
    folded = norm is not None or silu_mul or residual is not None
    if folded and (m != 1 or (norm is not None and silu_mul)):
        raise ValueError("fp8_gemv folds a norm, SiLU*mul or residual for one row (not both)")
    if residual is not None and (residual.shape != (m, n) or not residual.is_contiguous()):
        raise ValueError(f"fp8_gemv residual must be contiguous [{m}, {n}]: {residual.shape}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_n, block_k, split_k, *launch = config or gemv_config(
        m, n, k, block is not None, num_sms(x.device)
    )
    groups = block_k // block if block else 1
    if block and (block % block_n or groups * block != block_k or groups > (16 if m == 1 else 1)):
        raise ValueError(f"fp8_gemv: tiles {block_n} x {block_k} for {block}-blocks, {m} rows")
    n_blocks = triton.cdiv(n, block_n)
    tiles_per_split = max(1, triton.cdiv(triton.cdiv(k, block_k), split_k))
    part, counters = split_workspace(split_k, m, n, n_blocks, out)
    sumsq = out  # unread without a residual
    if residual is not None:
        sumsq = torch.empty((m, n_blocks), dtype=torch.float32, device=x.device)
    norm_w, norm_sumsq, eps, parts = norm_args(norm, out)
    flag = pdl.use_pdl(x)
    _fp8_gemv_kernel[(n_blocks, split_k)](
        x, weight, w_scale, out if bias is None else bias, out, part, counters,
        out if residual is None else residual, sumsq, norm_w, norm_sumsq, parts, eps,
        m, n, k, x.stride(0), w_scale.shape[-1], tiles_per_split,
        BLOCKWISE=block is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        SILU_MUL=silu_mul, NORM=norm is not None, BLOCK_P=triton.next_power_of_2(parts),
        RESIDUAL=residual is not None,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP=block or block_k, EVEN_K=k % block_k == 0, USE_PDL=flag,
        AMAX_BLOCK=min(AMAX_BLOCK, triton.next_power_of_2(k)), DOT_F32=not x.is_cuda,
        num_warps=launch[0] if launch else 4, num_stages=launch[1] if len(launch) > 1 else 3,
        launch_pdl=flag,
    )  # fmt: skip
    return out if residual is None else AddedResidual(out, sumsq)
