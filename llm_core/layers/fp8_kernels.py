"""Triton kernels of FP8 W8A8 linears: E4M3 weights with per-channel or 128x128 block
scales, activations quantized per token (per 128-feature group for block weights) on the fly.

- `quantize_rows`: dynamic activation quantization, one program per row (and group).
- `fp8_gemm`: `[BLOCK_M, 128] x [128, BLOCK_N]` FP8 tiles on tensor cores (fp32 accumulation),
  each K tile's product scaled by its activation group's and weight block's scales (block), or
  the whole sum by the row's and channel's (channel). Per-channel weights on CUDA with
  16-aligned shapes go to `torch._scaled_mm` instead (`quantization/fp8.py`).
- `fp8_gemv` (batch-1 decode): a program owns `BLOCK_N` weight rows and streams them along K
  (FP8: half the bytes of the 16-bit GEMV); it first reads its x row for the row's scale (per
  group: each tile's own), quantizes x as it loads it and multiplies in fp32: the same numbers
  as `quantize_rows` + GEMM, in one launch. Split-K as the 16-bit GEMV.
Launch parameters derive from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv import num_sms

FP8_MAX = tl.constexpr(448.0)  # a global a kernel reads must be a constexpr
MIN_SCALE = tl.constexpr(1e-12)
GEMV_MAX_ROWS = 8
# x features a load in the FP8 GEMV's amax pass (32 a thread at 4 warps): K = 18944 (a 7B's
# down_proj) in 5 loads, not 37 of BLOCK_K
AMAX_BLOCK = 4096


@triton.jit
def _quant(x, scale):
    """x / scale clamped to E4M3's range, in fp32 (the caller casts)."""
    return tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, scale_ptr, K, stride_xm, n_groups,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (row, group): the group's amax -> scale, then the quantized features."""
    row = tl.program_id(0)
    grp = tl.program_id(1)
    pdl.wait(USE_PDL)
    start = grp * GROUP
    stop = tl.minimum(start + GROUP, K)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(start, stop, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < stop, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row * n_groups + grp, scale)
    for k0 in range(start, stop, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < stop, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * K + k, _quant(x, scale).to(out_ptr.dtype.element_ty),
                 mask=k < stop)  # fmt: skip


def quantize_rows(x: torch.Tensor, group: int | None = None):
    """(fp8 `[M, K]`, fp32 scales `[M, 1]` or `[M, K / group]`): `fp8_ops.quantize_per_token`."""
    m, k = x.shape
    groups = 1 if group is None else k // group
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scales
    x = x if x.stride(-1) == 1 else x.contiguous()
    span = k if group is None else group
    flag = pdl.use_pdl(x)
    _quantize_rows_kernel[(m, groups)](
        x, out, scales, k, x.stride(0), groups, GROUP=span,
        BLOCK=min(1024, triton.next_power_of_2(span)), USE_PDL=flag, launch_pdl=flag,
    )  # fmt: skip
    return out, scales


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr,
    M, N, K, a_groups, w_kblocks,
    BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """out = (a * a_scale) @ (w * w_scale)^T. BLOCKWISE: BLOCK_K = 128 = the scale blocks, so
    each K tile's partial product takes one activation scale per row and one weight scale per
    (128-feature block of) output; else the scales apply once, at the end."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * grid_n)
    first_m = band * GROUP_M
    band_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % band_rows
    pid_n = (pid % (GROUP_M * grid_n)) // band_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * K
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pdl.wait(USE_PDL)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_F32:  # the interpreter has no FP8 dot
            part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, w)
        if BLOCKWISE:
            kb = k0 // BLOCK_K
            sa = tl.load(a_scale_ptr + offs_m * a_groups + kb, mask=m_mask, other=0.0)
            sw = tl.load(w_scale_ptr + (offs_n // BLOCK_K) * w_kblocks + kb, mask=n_mask,
                         other=0.0)  # fmt: skip
            acc += part * sa[:, None] * sw[None, :]
        else:
            acc += part
    if not BLOCKWISE:
        sa = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        sw = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_gemm(x, weight, w_scale, block: int | None = None, bias=None, out_dtype=None):
    """`x [M, K]` (16-bit; quantized here) times the FP8 `weight [N, K]`: `[M, N]`.
    `w_scale`: `[N, 1]` per channel, or `[ceil(N/128), K/128]` with `block=128`."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    xq, xs = quantize_rows(x, block)
    if x.is_cuda:
        block_m = 64 if m <= 64 else 128
        cfg = dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=8 if block_m == 128 else 4,
                   num_stages=3)  # fmt: skip
    else:  # interpreted: small tiles
        cfg = dict(BLOCK_M=16, BLOCK_N=16)
    flag = pdl.use_pdl(x)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](
        xq, xs, weight, w_scale, out if bias is None else bias, out,
        m, n, k, xs.shape[1], w_scale.shape[-1],
        BLOCKWISE=block is not None, HAS_BIAS=bias is not None, DOT_F32=not x.is_cuda,
        BLOCK_K=128 if block is not None or x.is_cuda else 32, GROUP_M=8, USE_PDL=flag,
        launch_pdl=flag, **cfg,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
    M, N, K, stride_xm, w_kblocks, tiles_per_split,
    BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    AMAX_BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (n block, k split): out[m, f] = sum_k q(x[m, k]) * w[f, k] * scales, x's
    quantization done here (per row: a first pass over the row for its amax, `AMAX_BLOCK`
    features a load so the weights start streaming after a few loads, not K / BLOCK_K
    dependent ones; blockwise: per 128-feature tile, BLOCK_K = 128)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    pdl.wait(USE_PDL)
    x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if not BLOCKWISE:  # each row's scale from its whole amax (every program reads x: small)
        offs_a = tl.arange(0, AMAX_BLOCK)
        for m in tl.static_range(BLOCK_M):
            amax = tl.zeros((AMAX_BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, AMAX_BLOCK):
                k = k0 + offs_a
                x = tl.load(x_ptr + m * stride_xm + k, mask=(k < K) & (m < M), other=0.0)
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
            x_scale += tl.where(offs_m == m, scale, 0.0)
    for tile in range(tile_start, tile_end):
        k = tile * BLOCK_K + offs_k
        k_mask = k < K
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)  # fmt: skip
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * stride_xm + k, mask=k_mask & (m < M), other=0.0)
            x = x.to(tl.float32)
            if BLOCKWISE:  # this tile is one activation group
                scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
            else:
                scale = tl.sum(tl.where(offs_m == m, x_scale, 0.0), 0)
            xq = _quant(x, scale).to(tl.float8e4nv).to(tl.float32)
            dot = tl.sum(w * xq[None, :], axis=1) * scale  # [BLOCK_N]
            part += tl.where(offs_m[None, :] == m, dot[:, None], 0.0)
        if BLOCKWISE:
            sw = tl.load(w_scale_ptr + (offs_n // BLOCK_K) * w_kblocks + tile, mask=n_mask,
                         other=0.0)  # fmt: skip
            part = part * sw[:, None]
        acc += part
    if not BLOCKWISE:
        acc = acc * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    out_offs = offs_m[None, :] * N + offs_n[:, None]
    out_mask = (offs_m[None, :] < M) & n_mask[:, None]
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split sums all of them in split order
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + sk * M * N + out_offs, mask=out_mask, other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def gemv_config(m: int, n: int, k: int, blockwise: bool, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): 8 rows x 512 FP8 bytes a tile (128 for block weights: one
    scale block), K split to ~4 programs per SM. Not tuned on a GPU yet."""
    block_k = 128 if blockwise else min(512, triton.next_power_of_2(k))
    block_n = 8 if n >= 8 * 4 * sms else 4
    tiles = triton.cdiv(k, block_k)
    split_k = 1
    while split_k < 16 and triton.cdiv(n, block_n) * split_k < 4 * sms and tiles >= 4 * split_k:
        split_k *= 2
    return block_n, block_k, split_k


def fp8_gemv(x, weight, w_scale, block: int | None = None, bias=None, config=None):
    """`x [M <= 8, K]` (16-bit) times the FP8 `weight [N, K]` (scales as `fp8_gemm`)."""
    m, k = x.shape
    n = weight.shape[0]
    if m > GEMV_MAX_ROWS or weight.shape[1] != k:
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_n, block_k, split_k = config or gemv_config(m, n, k, block is not None,
                                                      num_sms(x.device))  # fmt: skip
    if block is not None and block_k != block:
        raise ValueError("fp8_gemv: block weights need BLOCK_K == the block (128)")
    n_blocks = triton.cdiv(n, block_n)
    tiles_per_split = max(1, triton.cdiv(triton.cdiv(k, block_k), split_k))
    if split_k > 1:
        part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, n_blocks)
    else:
        part, counters = out, out  # unread
    flag = pdl.use_pdl(x)
    _fp8_gemv_kernel[(n_blocks, split_k)](
        x, weight, w_scale, out if bias is None else bias, out, part, counters,
        m, n, k, x.stride(0), w_scale.shape[-1], tiles_per_split,
        BLOCKWISE=block is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=flag,
        AMAX_BLOCK=min(AMAX_BLOCK, triton.next_power_of_2(k)), num_warps=4, launch_pdl=flag,
    )  # fmt: skip
    return out
