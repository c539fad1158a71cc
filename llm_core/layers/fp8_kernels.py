"""Triton kernels of FP8 W8A8 linears: E4M3 weights with per-channel or 128x128 block
scales, activations quantized per token (per 128-feature group for block weights) on the fly.

- `quantize_rows`: dynamic activation quantization, one program per row (and group).
- `fp8_gemm`: `[BLOCK_M, 128] x [128, BLOCK_N]` FP8 tiles on tensor cores (fp32 accumulation),
  each K tile's product scaled by its activation group's and weight block's scales (block), or
  the whole sum by the row's and channel's (channel); split-K into fp32 planes summed in
  order by `_sum_splits_kernel`. Per-channel weights on CUDA with 16-aligned shapes go to
  `torch._scaled_mm` instead from `fp8.TRITON_MAX_ROWS` + 1 rows (`quantization/fp8.py`).
- `fp8_gemv` (batch-1 decode): `fp8_gemv.py`.
Launch parameters derive from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl

FP8_MAX = tl.constexpr(448.0)  # a global a kernel reads must be a constexpr
MIN_SCALE = tl.constexpr(1e-12)


@triton.jit
def quantize_e4m3(x, scale):
    """x / scale clamped to E4M3's range, in fp32 (the caller casts)."""
    return tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)


# a row (or group) of at most this many features is read once, whole (`_quantize_rows_kernel`'s
# one pass: one load of each element, its amax, the quantized store); longer ones twice
ONE_PASS_MAX = 32768


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, scale_ptr, K, stride_xm, n_groups,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (row, group): the group's amax -> scale, then the quantized features. ONE_PASS
    (BLOCK >= GROUP): the group in registers, loaded once; else an amax pass, then a second
    pass that loads again and stores."""
    row = tl.program_id(0)
    grp = tl.program_id(1)
    pdl.wait(USE_PDL)
    start = grp * GROUP
    stop = tl.minimum(start + GROUP, K)
    if ONE_PASS:
        k = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < stop, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
        tl.store(scale_ptr + row * n_groups + grp, scale)
        tl.store(out_ptr + row * K + k, quantize_e4m3(x, scale).to(out_ptr.dtype.element_ty),
                 mask=k < stop)  # fmt: skip
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(start, stop, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + k, mask=k < stop, other=0.0).to(tl.float32)
            ax = tl.abs(x)
            amax = tl.where(ax > amax, ax, amax)
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
        tl.store(scale_ptr + row * n_groups + grp, scale)
        for k0 in range(start, stop, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + k, mask=k < stop, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * K + k, quantize_e4m3(x, scale).to(out_ptr.dtype.element_ty),
                     mask=k < stop)  # fmt: skip


def quantize_rows(x: torch.Tensor, group: int | None = None):
    """(fp8 `[M, K]`, fp32 scales `[M, 1]` or `[M, K / group]`): `fp8_ops.quantize_per_token`.
    A row (group) of up to `ONE_PASS_MAX` features is loaded once, by up to 16 warps (32-64
    features a thread): H100, up to 64 rows of a 7B's K 3584 / 18944, 1.2-2.7 us against
    1.8-5.3 for two passes of 1024-feature loads (`bench_quant_kernels.py --only
    quantize_rows`, docs/performance.md)."""
    m, k = x.shape
    groups = 1 if group is None else k // group
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scales
    x = x if x.stride(-1) == 1 else x.contiguous()
    span = k if group is None else group
    one_pass = span <= ONE_PASS_MAX
    block = triton.next_power_of_2(span) if one_pass else 1024
    warps = min(16, max(1, block // 1024)) if one_pass else 4
    flag = pdl.use_pdl(x)
    _quantize_rows_kernel[(m, groups)](
        x, out, scales, k, x.stride(0), groups, GROUP=span, BLOCK=block, ONE_PASS=one_pass,
        USE_PDL=flag, num_warps=warps, launch_pdl=flag,
    )  # fmt: skip
    return out, scales


# Rows up to which `fp8_gemm` (per-channel) takes narrow N tiles with deep K: decode batches,
# where a 3584-wide output must spread over ~112 CTAs (`bench_quant_kernels.py --only fp8_rows`)
NARROW_MAX_ROWS = 64


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr,
    M, N, K, a_groups, w_kblocks, k_per_split,
    BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """out = (a * a_scale) @ (w * w_scale)^T. BLOCKWISE: BLOCK_K = 128 = the scale blocks, so
    each K tile's partial product takes one activation scale per row and one weight scale per
    (128-feature block of) output; else the scales apply once, at the end. SPLIT_K > 1: program
    (tile, s) sums features [s * k_per_split, (s + 1) * k_per_split) and stores its scaled fp32
    partial (the bias in split 0's) at `out_ptr`'s plane s; `_sum_splits_kernel` adds them."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
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
    k_stop = tl.minimum(K, (split + 1) * k_per_split)
    for k0 in range(split * k_per_split, k_stop, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_stop
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
        bias = tl.load(b_ptr + offs_n, mask=n_mask & (split == 0), other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out = out_ptr + split.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr):  # fmt: skip
    """out = the sum of the SPLIT_K fp32 planes of `size` elements, in split order (the same
    sum every run: no atomics), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    pdl.wait(USE_PDL)
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fp8_gemm(x, weight, w_scale, block: int | None = None, bias=None, out_dtype=None,
             config: dict | None = None):  # fmt: skip
    """`x [M, K]` (16-bit; quantized here) times the FP8 `weight [N, K]`: `[M, N]`.
    `w_scale`: `[N, 1]` per channel, or `[ceil(N/128), K/128]` with `block=128`. `config`:
    BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages over the default (benchmarks
    sweep it). SPLIT_K > 1 cuts K into that many spans of whole BLOCK_K tiles, each summed by
    its own programs into an fp32 plane, then added in a fixed order (deterministic)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    xq, xs = quantize_rows(x, block)
    if x.is_cuda and m <= NARROW_MAX_ROWS and block is None:
        cfg = dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=32, BLOCK_K=256, num_warps=4,
                   num_stages=4)  # fmt: skip
    elif x.is_cuda:
        block_m = 64 if m <= 64 else 128
        cfg = dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=8 if block_m == 128 else 4,
                   num_stages=3)  # fmt: skip
    else:  # interpreted: small tiles
        cfg = dict(BLOCK_M=16, BLOCK_N=16)
    cfg = {"BLOCK_K": 128 if block is not None or x.is_cuda else 32, **cfg, **(config or {})}
    tiles = triton.cdiv(k, cfg["BLOCK_K"])
    split = min(cfg.pop("SPLIT_K", 1), tiles)
    k_per_split = triton.cdiv(tiles, split) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)  # every split has features
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                                device=x.device)  # fmt: skip
    flag = pdl.use_pdl(x)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _fp8_gemm_kernel[grid](
        xq, xs, weight, w_scale, out if bias is None else bias, target,
        m, n, k, xs.shape[1], w_scale.shape[-1], k_per_split,
        BLOCKWISE=block is not None, HAS_BIAS=bias is not None, DOT_F32=not x.is_cuda,
        GROUP_M=8, SPLIT_K=split, USE_PDL=flag, launch_pdl=flag, **cfg,
    )  # fmt: skip
    if split > 1:
        size, width = m * n, 1024
        _sum_splits_kernel[(triton.cdiv(size, width),)](
            target, out, size, SPLIT_K=split, BLOCK=width, USE_PDL=flag, launch_pdl=flag
        )
    return out
