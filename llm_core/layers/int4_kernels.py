"""Triton kernels of INT4 weight-only linears (W4A16: AWQ / GPTQ weights, 16-bit activations).

The weight arrives in one layout for both formats (`quantization/int4_pack.py`): `qweight`
int32 `[K/8, N]` (8 consecutive input features per int32), `zeros` uint8 `[G, N]`, `scales`
`[G, N]`, groups of `group_size` consecutive input features (act-order checkpoints are sorted
by group on load and gather x's features through `perm`).

- `int4_gemv` (decode, a few rows): `int4_gemv.py`.
- `int4_gemm` (prefill): tiles of `[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`; the weight tile
  is unpacked and dequantized to the activation dtype in registers (`(q - z) * s`, rounded
  once) and multiplied on tensor cores (`tl.dot`, fp32 accumulation).
Launch parameters derive from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl


def tile_k(group_size: int, cap: int = 128) -> int:
    """The widest power-of-two K tile (<= cap) inside one group: every tile has one group."""
    tile = cap
    while group_size % tile:
        tile //= 2
    return tile


@triton.jit(do_not_specialize=["M"])
def _int4_gemm_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, perm_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, group_size,
    HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """One `[BLOCK_M, BLOCK_N]` output tile; programs walk the tiles in GROUP_M-row bands so
    neighbours share weight tiles in L2."""
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
    shifts = (offs_k % 8) * 4  # [BLOCK_K]: each feature's nibble in its packed int32
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pdl.wait(USE_PDL)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        src = tl.load(perm_ptr + k, mask=k_mask, other=0) if HAS_PERM else k
        a = tl.load(x_rows + src[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # each int32 is read by the 8 features it holds (the repeats hit L1)
        p = tl.load(qw_ptr + (k // 8).to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)  # fmt: skip
        g = k0 // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        q = ((p >> shifts[:, None]) & 0xF).to(tl.float32)  # [BLOCK_K, BLOCK_N]
        w = ((q - z[None, :]) * s[None, :]).to(a.dtype)
        if DOT_F32:  # fp32 activations, or the interpreter (no 16-bit tl.dot there)
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm_config(m: int, n: int, group_size: int, is_cuda: bool) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); small tiles when interpreted. Not
    tuned on a GPU yet (docs/performance.md)."""
    if not is_cuda:
        return 16, 16, tile_k(group_size, 32), 4, 1
    block_m = 64 if m <= 64 else 128
    return block_m, 128, tile_k(group_size, 64), 8 if block_m == 128 else 4, 3


def int4_gemm(x, qweight, zeros, scales, group_size, perm=None, bias=None, config=None):
    """`x [M, K]` times the INT4 weight: `[M, N]` in x's dtype (any M; meant for M > 8)."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"int4_gemm: x {tuple(x.shape)} vs qweight {tuple(qweight.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n, block_k, warps, stages = config or gemm_config(m, n, group_size, x.is_cuda)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    flag = pdl.use_pdl(x)
    extra = {"num_warps": warps, "num_stages": stages} if x.is_cuda else {}
    _int4_gemm_kernel[grid](
        x, qweight, zeros, scales, qweight if perm is None else perm,
        out if bias is None else bias, out,
        m, n, k, x.stride(0), group_size,
        HAS_BIAS=bias is not None, HAS_PERM=perm is not None,
        DOT_F32=not x.is_cuda or x.dtype == torch.float32,  # fp32: exact products, not tf32
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, USE_PDL=flag,
        launch_pdl=flag, **extra,
    )  # fmt: skip
    return out
