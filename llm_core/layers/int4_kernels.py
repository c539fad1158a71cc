"""Triton kernels of INT4 weight-only linears (W4A16: AWQ / GPTQ weights, 16-bit activations).

The weight arrives in one layout for both formats (`quantization/int4_pack.py`): `qweight`
int32 `[K/8, N]` (8 consecutive input features per int32, nibble j holds feature 8 r + j),
`zeros` uint8 `[G, N]`, `scales` `[G, N]`, groups of `group_size` consecutive input features
(act-order checkpoints are sorted by group on load and gather x's features through `perm`).

- `int4_gemv` (decode, a few rows): `int4_gemv.py`.
- `int4_gemm` (prefill): tiles of `[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`, one group per K
  tile. Each packed int32 is loaded once (`[BLOCK_K/8, BLOCK_N]`, pipelined like x's tile) and
  makes its 8 weights with one shift and no int-to-float converts: nibble i of p (0-4), or of
  p >> 12 (nibbles 5-7 at 2-4), masked in place is the denormal float `q 16^i 2^-149`, and one
  FMA a weight, `q 16^i 2^-149 * s 2^(111 - 4i) - z s 2^-38`, gives `(q - z) s 2^-38`
  exactly (the terms are per feature and tile). The 8 nibble tiles are joined and reshaped
  into the natural K order, so x's tile is a plain contiguous load (act order: x's columns
  gathered once, before the kernel). The weight is rounded once to x's dtype (bf16 and fp32
  keep the 2^-38 exactly and the accumulator is scaled back at the end; fp16's range cannot,
  its weights are scaled back before rounding) and multiplied on tensor cores (`tl.dot`, fp32
  accumulation). Exact for scales in [2^-88, 2^17): every fp16 scale.
- `int4_matmul_dequantized` (large M): `int4_dequantize` writes the whole weight `[K, N]` in
  x's dtype and feature order, and cuBLAS multiplies; the dequantization amortizes over rows.
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


@triton.jit
def _dequant_tile(p, s, z, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`[BLOCK_K, BLOCK_N]` fp32 weights `(q - z) s 2^-38`, exact, in natural K order (row
    8 r + j), from packed `p [BLOCK_K/8, BLOCK_N]` and one group's `s`, `z [BLOCK_N]`."""
    hi = p >> 12  # nibbles 5-7 at bits 8-19, as nibbles 2-4 of p
    s0 = (s * 2.596148429267414e33)[None, :]  # 2^111: nibble 0 in place is q 2^-149
    s1 = (s * 1.6225927682921336e32)[None, :]  # 2^107
    s2 = (s * 1.0141204801825835e31)[None, :]  # 2^103
    s3 = (s * 6.338253001141147e29)[None, :]  # 2^99
    s4 = (s * 3.961408125713217e28)[None, :]  # 2^95
    c = (z * (s * -3.637978807091713e-12))[None, :]  # -z s 2^-38
    w0 = (p & 0xF).to(tl.float32, bitcast=True) * s0 + c
    w1 = (p & 0xF0).to(tl.float32, bitcast=True) * s1 + c
    w2 = (p & 0xF00).to(tl.float32, bitcast=True) * s2 + c
    w3 = (p & 0xF000).to(tl.float32, bitcast=True) * s3 + c
    w4 = (p & 0xF0000).to(tl.float32, bitcast=True) * s4 + c
    w5 = (hi & 0xF00).to(tl.float32, bitcast=True) * s2 + c
    w6 = (hi & 0xF000).to(tl.float32, bitcast=True) * s3 + c
    w7 = (hi & 0xF0000).to(tl.float32, bitcast=True) * s4 + c
    # [BLOCK_K/8, BLOCK_N, 2, 2, 2]: nibble j0 + 2 j1 + 4 j2 at [r, n, j0, j1, j2]
    w = tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)),
                tl.join(tl.join(w4, w5), tl.join(w6, w7)))  # fmt: skip
    return tl.permute(w, (0, 4, 3, 2, 1)).reshape(BLOCK_K, BLOCK_N)  # [r, j2, j1, j0, n] -> [k, n]


@triton.jit(do_not_specialize=["M"])
def _int4_gemm_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SCALE_ACC: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_TILES: tl.constexpr, GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """One `[BLOCK_M, BLOCK_N]` output tile; programs walk the tiles in GROUP_M-row bands so
    neighbours share weight tiles in L2. GROUP_TILES: K tiles per group. SCALE_ACC: the dot's
    weights carry 2^-38 (bf16, fp32), else they are scaled back before rounding (fp16)."""
    BLOCK_KP: tl.constexpr = BLOCK_K // 8  # packed rows per tile
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
    offs_r = tl.arange(0, BLOCK_KP)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # rows past M read row M - 1 (no mask: their results are not stored)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pdl.wait(USE_PDL)
    for tile in range(0, tl.cdiv(K, BLOCK_K)):
        k = tile * BLOCK_K + offs_k
        rows = tile * BLOCK_KP + offs_r  # packed rows of this tile
        if EVEN_K:
            a = tl.load(x_rows + k[None, :])
            p = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :],
                        mask=n_mask[None, :], other=0)  # fmt: skip
        else:
            a = tl.load(x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
            p = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :],
                        mask=(rows < K // 8)[:, None] & n_mask[None, :], other=0)  # fmt: skip
        g = tile // GROUP_TILES
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        w = _dequant_tile(p, s, z, BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N], times 2^-38
        if not SCALE_ACC:
            w = w * 274877906944.0  # 2^38, exact: fp16 rounds (q - z) s itself
        if DOT_F32:  # fp32 activations, or the interpreter (no 16-bit tl.dot there)
            acc += tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    if SCALE_ACC:
        acc = acc * 274877906944.0  # 2^38
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm_config(m: int, n: int, group_size: int, is_cuda: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K divides the group (one group
    per K tile), 128 where it can (the per-feature scale terms amortize over more rows). Small
    tiles when interpreted. Counted offline (tests/llm_core/test_int4_gemm_sass.py: ~5.1 SASS
    instructions a weight for both), not yet swept on a GPU (docs/performance.md). Tiles with
    BLOCK_N = 32 num_warps (64 x 128 on 4 warps, 128 x 256 on 8) are legal but convert the
    scale vectors through shared memory every K tile (12 more barriers)."""
    if not is_cuda:
        return 16, 16, tile_k(group_size, 32), 4, 1
    if m <= 64:  # few rows: more feature blocks to spread the weight over the SMs
        return 64, 64, tile_k(group_size), 4, 4
    return 128, 128, tile_k(group_size), 8, 3


def int4_gemm(x, qweight, zeros, scales, group_size, perm=None, bias=None, config=None):
    """`x [M, K]` times the INT4 weight: `[M, N]` in x's dtype (any M; meant for M > 4).
    `config`: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) as `gemm_config` makes them;
    BLOCK_K must divide the group and be a multiple of 8."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"int4_gemm: x {tuple(x.shape)} vs qweight {tuple(qweight.shape)}")
    block_m, block_n, block_k, warps, stages = config or gemm_config(m, n, group_size, x.is_cuda)
    if group_size % block_k or block_k % 8:
        raise ValueError(f"int4_gemm: BLOCK_K {block_k} must divide the group ({group_size})")
    if perm is not None:  # act order: x's features in the sorted rows' order, once
        x = x.index_select(1, perm)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    flag = pdl.use_pdl(x)
    extra = {"num_warps": warps, "num_stages": stages} if x.is_cuda else {}
    _int4_gemm_kernel[grid](
        x, qweight, zeros, scales, out if bias is None else bias, out,
        m, n, k, x.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        SCALE_ACC=x.dtype != torch.float16,
        DOT_F32=not x.is_cuda or x.dtype == torch.float32,  # fp32: exact products, not tf32
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_TILES=group_size // block_k,
        GROUP_M=8, USE_PDL=flag, launch_pdl=flag, **extra,
    )  # fmt: skip
    return out


@triton.jit
def _int4_dequant_kernel(
    qw_ptr, z_ptr, s_ptr, perm_ptr, out_ptr, N, K, group_size,
    HAS_PERM: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """`[BLOCK_KP, BLOCK_N]` packed weights -> rows 8 r + j (act order: perm[8 r + j]) of the
    `[K, N]` weight in out's dtype, `((q - z) s)` exact in fp32 and rounded once."""
    rows = tl.program_id(0) * BLOCK_KP + tl.arange(0, BLOCK_KP)  # packed rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < K // 8
    mask = r_mask[:, None] & (offs_n < N)[None, :]
    p = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    g = (rows * 8 // group_size).to(tl.int64)[:, None] * N + offs_n[None, :]  # 8 | group
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
    for j in tl.static_range(8):
        w = (((p >> (4 * j)) & 0xF).to(tl.float32) - z) * s
        k = rows * 8 + j
        if HAS_PERM:  # sorted row k multiplies x's feature perm[k]
            k = tl.load(perm_ptr + k, mask=r_mask, other=0)
        out = out_ptr + k.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


def int4_dequantize(qweight, zeros, scales, group_size, perm=None, dtype=torch.bfloat16):
    """The INT4 weight as a dense `[K, N]` tensor of `dtype`, rows in x's feature order (act
    order: row perm[k] is sorted row k): `int4_pack.dequantize(...).t().to(dtype)` exactly."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_kp, block_n = (16, 128) if qweight.is_cuda else (4, 16)
    grid = (triton.cdiv(k // 8, block_kp), triton.cdiv(n, block_n))
    extra = {"num_warps": 4} if qweight.is_cuda else {}
    _int4_dequant_kernel[grid](
        qweight, zeros, scales, qweight if perm is None else perm, out, n, k, group_size,
        HAS_PERM=perm is not None, BLOCK_KP=block_kp, BLOCK_N=block_n, **extra,
    )  # fmt: skip
    return out


def int4_matmul_dequantized(x, qweight, zeros, scales, group_size, perm=None, bias=None):
    """`x [M, K]` times the INT4 weight through a dense copy and cuBLAS (large M: the
    dequantization, one pass over the weight, amortizes over the rows). Same arguments as
    `int4_gemm`; the weight rounds to x's dtype as there."""
    w = int4_dequantize(qweight, zeros, scales, group_size, perm, x.dtype)  # [K, N]
    if bias is None:
        return torch.matmul(x, w)
    return torch.addmm(bias.to(x.dtype), x, w)
