"""The INT4 GEMV (W4A16 decode: 1-4 rows of x times an AWQ / GPTQ weight in the layout of
`int4_kernels.py`: `qweight` int32 `[K/8, N]`, `zeros` uint8 `[G, N]`, `scales` `[G, N]`).

A program owns `BLOCK_N` features and streams their packed weight along K, one tile inside one
group, so a tile's scale and zero are one value per feature. Nibbles 0-3 of a packed int32 `p`
are read in place from `p`, nibbles 4-7 from `p >> 16`: nibble `i` (of 4) masked in place is the
denormal float `q 16^i 2^-149` (fp32 FMAs keep denormals: no `.ftz` in Triton's PTX), and x's
feature, scaled by `2^100 16^-i` as it is loaded, times it is `q x 2^-49` exactly. The zero
enters once per packed row and feature (`- z * sum of the row's 8 x`), the scale once per tile.
So a nibble costs one LOP3 and one FFMA per row: no shifts, no int-to-float converts, no
zero subtraction, no cross-thread sums in the loop (each row has its own 2-D accumulator,
summed over the packed rows once per program). Split-K programs add fp32 partials; the last
to arrive sums them in order (one launch). The first tile (weights, scales, zeros) loads before
the PDL wait, as the 16-bit GEMV's (H200 AWQ decode 396.3 -> 414.6 tokens/s).
Launch parameters derive from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.layers.gemv import (
    num_sms,
    split_workspace,
)
from polymodal.llm_core.layers.gemv_folds import load_x_folded, norm_args, one_row_rstd
from polymodal.llm_core.layers.int4_kernels import tile_k
from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

GEMV_MAX_ROWS = 4


@triton.jit
def _feature(row, cols, j, x_mask, K, perm_ptr, norm_w_ptr, rstd,
             HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """x's feature 8 r + j of each packed row r (act order: the one its sorted row takes), in
    fp32, with the folds of `gemv_folds.load_x_folded`."""
    idx = cols + j
    if HAS_PERM:
        idx = tl.load(perm_ptr + idx, mask=x_mask, other=0)
    x = load_x_folded(row, idx, x_mask, K, norm_w_ptr, rstd, SILU_MUL, NORM)
    return x.to(tl.float32)


@triton.jit
def _row_tile(x_ptr, m, stride_xm, cols, x_mask, K, perm_ptr, norm_w_ptr, rstd,
              HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """Row m's x for one tile, as 9 `[BLOCK_KP]` vectors: each packed row's sum of its 8
    features times 2^-49 (the zero's term), then feature 8 r + j scaled by 2^100 16^-(j % 4) (a
    product with its denormal nibble is then q x 2^-49, in fp32's normal range for |x| in
    [2^-77, 2^28])."""
    row = x_ptr + m * stride_xm
    x0 = _feature(row, cols, 0, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x1 = _feature(row, cols, 1, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x2 = _feature(row, cols, 2, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x3 = _feature(row, cols, 3, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x4 = _feature(row, cols, 4, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x5 = _feature(row, cols, 5, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x6 = _feature(row, cols, 6, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    x7 = _feature(row, cols, 7, x_mask, K, perm_ptr, norm_w_ptr, rstd, HAS_PERM, SILU_MUL, NORM)
    return ((x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7) * 1.7763568394002505e-15,  # 2^-49
            x0 * 1.2676506002282294e30, x1 * 7.922816251426434e28,  # 2^100, 2^96
            x2 * 4.951760157141521e27, x3 * 3.094850098213451e26,  # 2^92, 2^88
            x4 * 1.9342813113834067e25, x5 * 4.951760157141521e27,  # 2^84, 2^92
            x6 * 3.094850098213451e26, x7 * 1.9342813113834067e25)  # 2^88, 2^84  # fmt: skip


@triton.jit
def _tile_dot(p, hi, z, x):
    """sum_j (q_j - z) x_j 2^-49 over one tile's packed rows, `[NT, BLOCK_KP, SUB_N]` (x:
    `_row_tile`'s). Nibble i of p masked in place is the denormal float q 16^i 2^-149; its
    product with x's scaled feature is exact."""
    acc = (p & 0xF).to(tl.float32, bitcast=True) * x[1][None, :, None]
    acc += (p & 0xF0).to(tl.float32, bitcast=True) * x[2][None, :, None]
    acc += (p & 0xF00).to(tl.float32, bitcast=True) * x[3][None, :, None]
    acc += (p & 0xF000).to(tl.float32, bitcast=True) * x[4][None, :, None]
    acc += (p & 0xF0000).to(tl.float32, bitcast=True) * x[5][None, :, None]
    acc += (hi & 0xF00).to(tl.float32, bitcast=True) * x[6][None, :, None]
    acc += (hi & 0xF000).to(tl.float32, bitcast=True) * x[7][None, :, None]
    acc += (hi & 0xF0000).to(tl.float32, bitcast=True) * x[8][None, :, None]
    return acc - z * x[0][None, :, None]


@triton.jit
def _load_tile(qw_ptr, z_ptr, s_ptr, tile, offs_r, offs_n, n_mask, N, K,
               BLOCK_KP: tl.constexpr, GROUP_TILES: tl.constexpr):  # fmt: skip
    """One K tile's packed weights `[NT, BLOCK_KP, SUB_N]` (rows past K: 0), and its group's
    scales (times 2^49: the dots' unit back to 1) and zeros `[NT, 1, SUB_N]`, in fp32 (features
    outside `n_mask`: zeros, not read)."""
    rows = tile * BLOCK_KP + offs_r  # packed rows of this tile
    lo = tl.load(qw_ptr + rows.to(tl.int64)[None, :, None] * N + offs_n[:, None, :],
                 mask=(rows < K // 8)[None, :, None] & n_mask[:, None, :], other=0,
                 eviction_policy="evict_first")  # fmt: skip
    g = tile // GROUP_TILES
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    s = (s * 562949953421312.0)[:, None, :]
    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None, :]
    return lo, s, z


@triton.jit
def _tile_step(acc0, acc1, acc2, acc3, lo, s, z, tile, offs_r, x_ptr, stride_xm, M, K,
               perm_ptr, norm_w_ptr, rstd0, rstd1, rstd2, rstd3, HAS_PERM: tl.constexpr,
               SILU_MUL: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_KP: tl.constexpr):  # fmt: skip
    """One loaded K tile (`_load_tile`) times each row's x: the rows' accumulators updated."""
    rows = tile * BLOCK_KP + offs_r
    cols = rows * 8  # x's first feature of each packed row
    x_mask = rows < K // 8
    hi = lo.to(tl.uint32, bitcast=True) >> 12  # nibbles 5-7 at bits 8-19 (logical shift)
    x = _row_tile(x_ptr, 0, stride_xm, cols, x_mask, K, perm_ptr, norm_w_ptr, rstd0,
                  HAS_PERM, SILU_MUL, NORM)  # fmt: skip
    acc0 += s * _tile_dot(lo, hi, z, x)
    if BLOCK_M > 1:
        x = _row_tile(x_ptr, 1, stride_xm, cols, x_mask & (M > 1), K, perm_ptr, norm_w_ptr,
                      rstd1, HAS_PERM, SILU_MUL, NORM)  # fmt: skip
        acc1 += s * _tile_dot(lo, hi, z, x)
    if BLOCK_M > 2:
        x = _row_tile(x_ptr, 2, stride_xm, cols, x_mask & (M > 2), K, perm_ptr, norm_w_ptr,
                      rstd2, HAS_PERM, SILU_MUL, NORM)  # fmt: skip
        acc2 += s * _tile_dot(lo, hi, z, x)
        x = _row_tile(x_ptr, 3, stride_xm, cols, x_mask & (M > 3), K, perm_ptr, norm_w_ptr,
                      rstd3, HAS_PERM, SILU_MUL, NORM)  # fmt: skip
        acc3 += s * _tile_dot(lo, hi, z, x)
    return acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _int4_gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, perm_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
    res_ptr, sumsq_ptr, norm_w_ptr, norm_sumsq_ptr, norm_parts, eps,
    M, N, K, stride_xm, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr,
    NORM: tl.constexpr, BLOCK_P: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_TILES: tl.constexpr, SUB_N: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    STAGES: tl.constexpr = 1,
):  # fmt: skip
    """Program (n block, k split): out[m, f] = sum over its K tiles of
    s[g, f] * sum_k (q[k, f] - z[g, f]) x[m, k] (the module docstring says how). x may be
    activated (SILU_MUL) or normalized (NORM) as it loads; RESIDUAL adds `res` to the output
    and writes each row's sum of squares over this feature block to `sumsq[m, pid_n]`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BLOCK_KP: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    NT: tl.constexpr = BLOCK_N // SUB_N  # sub-tiles: a thread's x serves NT times more nibbles
    offs_n = pid_n * BLOCK_N + tl.arange(0, NT)[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]
    offs_r = tl.arange(0, BLOCK_KP)
    n_mask = offs_n < N  # [NT, SUB_N]
    acc0 = tl.zeros((NT, BLOCK_KP, SUB_N), dtype=tl.float32)
    acc1 = tl.zeros((NT, BLOCK_KP, SUB_N), dtype=tl.float32)
    acc2 = tl.zeros((NT, BLOCK_KP, SUB_N), dtype=tl.float32)
    acc3 = tl.zeros((NT, BLOCK_KP, SUB_N), dtype=tl.float32)
    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    # the first tile's weights, scales and zeros before the PDL wait (nothing earlier writes
    # them): they stream in while the previous kernel ends (a split without tiles reads one)
    first = tl.maximum(tl.minimum(tile_start, tile_end - 1), 0)
    lo, s, z = _load_tile(qw_ptr, z_ptr, s_ptr, first, offs_r, offs_n, n_mask, N, K, BLOCK_KP,
                          GROUP_TILES)  # fmt: skip
    pdl.wait(USE_PDL)
    rstd0 = one_row_rstd(norm_sumsq_ptr, norm_parts, eps, 0, M, K, NORM, BLOCK_P)
    rstd1 = one_row_rstd(norm_sumsq_ptr, norm_parts, eps, 1, M, K, NORM and BLOCK_M > 1, BLOCK_P)
    rstd2 = one_row_rstd(norm_sumsq_ptr, norm_parts, eps, 2, M, K, NORM and BLOCK_M > 2, BLOCK_P)
    rstd3 = one_row_rstd(norm_sumsq_ptr, norm_parts, eps, 3, M, K, NORM and BLOCK_M > 2, BLOCK_P)
    if tile_start < tile_end:
        acc0, acc1, acc2, acc3 = _tile_step(
            acc0, acc1, acc2, acc3, lo, s, z, tile_start, offs_r, x_ptr, stride_xm, M, K,
            perm_ptr, norm_w_ptr, rstd0, rstd1, rstd2, rstd3, HAS_PERM, SILU_MUL, NORM,
            BLOCK_M, BLOCK_KP,
        )  # fmt: skip
    if PREFETCH:  # two tiles in flight: the next tile's loads issue before this tile's math
        lo, s, z = _load_tile(qw_ptr, z_ptr, s_ptr, tile_start + 1, offs_r, offs_n,
                              n_mask & (tile_start + 1 < tile_end), N, K, BLOCK_KP,
                              GROUP_TILES)  # fmt: skip
        for tile in range(tile_start + 1, tile_end):
            lo_next, s_next, z_next = _load_tile(
                qw_ptr, z_ptr, s_ptr, tile + 1, offs_r, offs_n, n_mask & (tile + 1 < tile_end),
                N, K, BLOCK_KP, GROUP_TILES,
            )  # fmt: skip
            acc0, acc1, acc2, acc3 = _tile_step(
                acc0, acc1, acc2, acc3, lo, s, z, tile, offs_r, x_ptr, stride_xm, M, K,
                perm_ptr, norm_w_ptr, rstd0, rstd1, rstd2, rstd3, HAS_PERM, SILU_MUL, NORM,
                BLOCK_M, BLOCK_KP,
            )  # fmt: skip
            lo, s, z = lo_next, s_next, z_next
    else:
        for tile in tl.range(tile_start + 1, tile_end, num_stages=STAGES):
            lo, s, z = _load_tile(qw_ptr, z_ptr, s_ptr, tile, offs_r, offs_n, n_mask, N, K,
                                  BLOCK_KP, GROUP_TILES)  # fmt: skip
            acc0, acc1, acc2, acc3 = _tile_step(
                acc0, acc1, acc2, acc3, lo, s, z, tile, offs_r, x_ptr, stride_xm, M, K,
                perm_ptr, norm_w_ptr, rstd0, rstd1, rstd2, rstd3, HAS_PERM, SILU_MUL, NORM,
                BLOCK_M, BLOCK_KP,
            )  # fmt: skip
    out_offs = offs_n  # row m's outputs at m N + offs_n
    if SPLIT_K > 1:
        part_ptr += pid_k * M * N
        tl.store(part_ptr + out_offs, tl.sum(acc0, axis=1), mask=n_mask)
        if BLOCK_M > 1:
            tl.store(part_ptr + N + out_offs, tl.sum(acc1, axis=1), mask=n_mask & (M > 1))
        if BLOCK_M > 2:
            tl.store(part_ptr + 2 * N + out_offs, tl.sum(acc2, axis=1), mask=n_mask & (M > 2))
            tl.store(part_ptr + 3 * N + out_offs, tl.sum(acc3, axis=1), mask=n_mask & (M > 3))
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split sums all of them, in split order
            part_ptr -= pid_k * M * N
            for m in tl.static_range(BLOCK_M):
                total = tl.zeros((NT, SUB_N), dtype=tl.float32)
                for sk in tl.static_range(SPLIT_K):
                    total += tl.load(
                        part_ptr + (sk * M + m) * N + out_offs,
                        mask=n_mask & (m < M),
                        other=0.0,
                        cache_modifier=".cg",
                    )
                _store_row(total, m, offs_n, n_mask, M, N, b_ptr, out_ptr, res_ptr,
                           sumsq_ptr, pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _store_row(tl.sum(acc0, axis=1), 0, offs_n, n_mask, M, N, b_ptr, out_ptr, res_ptr,
                   sumsq_ptr, pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip
        if BLOCK_M > 1:
            _store_row(tl.sum(acc1, axis=1), 1, offs_n, n_mask, M, N, b_ptr, out_ptr, res_ptr,
                       sumsq_ptr, pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip
        if BLOCK_M > 2:
            _store_row(tl.sum(acc2, axis=1), 2, offs_n, n_mask, M, N, b_ptr, out_ptr, res_ptr,
                       sumsq_ptr, pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip
            _store_row(tl.sum(acc3, axis=1), 3, offs_n, n_mask, M, N, b_ptr, out_ptr, res_ptr,
                       sumsq_ptr, pid_n, HAS_BIAS, RESIDUAL)  # fmt: skip


@triton.jit
def _store_row(out, m, offs_n, n_mask, M, N, b_ptr, out_ptr, res_ptr, sumsq_ptr, pid_n,
               HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
    """Row m's `[NT, SUB_N]` sums (+ bias) in the output dtype; RESIDUAL: plus the residual row
    (rounded as torch's add rounds) and the block's sum of squares of the result."""
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    mask = n_mask & (m < M)
    y = out.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        r = tl.load(res_ptr + m * N + offs_n, mask=mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(out_ptr.dtype.element_ty)
        h = tl.where(mask, y.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + m * tl.num_programs(0) + pid_n, tl.sum(tl.sum(h * h, 1), 0),
                 mask=m < M)  # fmt: skip
    tl.store(out_ptr + m * N + offs_n, y, mask=mask)


def gemv_config(m: int, n: int, k: int, group_size: int, sms: int) -> tuple:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, prefetch): 128 features (four 32-wide sub-tiles:
    a thread's x value feeds 16 nibbles; 64 for wide N, whose blocks alone fill the GPU), one
    group per K tile (<= 128), K split until there are ~16 programs per SM. From the H200 sweep
    at a 7B's shapes (scripts/bench_quant_kernels.py; docs/performance.md, fourteenth session):
    within 10% of the best config at every shape. One row of 128-feature blocks loads a tile
    ahead (H200, 2026-12-05, us: qkv 7.2 -> 7.0, o 6.2 -> 6.1, down 21.1 -> 19.4; gate_up's
    64-feature blocks 30.6 -> 31.2, so not there)."""
    block_n = 64 if n >= 16384 else 128
    block_k = tile_k(group_size)
    tiles = triton.cdiv(k, block_k)
    split_k = 1
    while split_k < 16 and triton.cdiv(n, block_n) * split_k < 16 * sms and tiles >= 2 * split_k:
        split_k *= 2
    return block_n, block_k, split_k, 4, m == 1 and block_n == 128


def int4_gemv(x, qweight, zeros, scales, group_size, perm=None, bias=None, config=None,
              silu_mul: bool = False, residual: torch.Tensor | None = None):  # fmt: skip
    """`x [M <= 4, K]` times the INT4 weight: `[M, N]` in x's dtype. `config`: (BLOCK_N,
    BLOCK_K, SPLIT_K[, num_warps[, prefetch[, stages]]]); BLOCK_K must divide the group;
    prefetch (one row): the next tile's loads issue before a tile's math (two tiles in flight
    a program); stages > 1: the K loop's tiles stream through shared memory (`cp.async`),
    stages - 1 tiles ahead, without the registers prefetch holds.
    As the 16-bit GEMV (`gemv.gemv`): x may be a `DeferredNorm` (normalized as it loads),
    `silu_mul` takes x as `[gate | up]`, and `residual` makes it return
    `AddedResidual(out + residual, sums of squares)` for the next GEMV's deferred norm."""
    norm = x if isinstance(x, DeferredNorm) else None
    x = norm.h if norm is not None else x
    m, width = x.shape
    k = width // 2 if silu_mul else width
    n = qweight.shape[1]
    if m > GEMV_MAX_ROWS or qweight.shape[0] * 8 != k or width % (1 + silu_mul):
        raise ValueError(f"int4_gemv: x {tuple(x.shape)} vs qweight {tuple(qweight.shape)}")
    if norm is not None and silu_mul:
        raise ValueError("int4_gemv: a deferred norm and silu_mul do not combine")
    if residual is not None and (residual.shape != (m, n) or not residual.is_contiguous()):
        raise ValueError(f"int4_gemv residual must be contiguous [{m}, {n}]: {residual.shape}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, split_k, *launch = config or gemv_config(
        m, n, k, group_size, num_sms(x.device)
    )
    prefetch = len(launch) > 1 and bool(launch[1])
    stages = launch[2] if len(launch) > 2 else 1
    if prefetch and stages > 1:
        raise ValueError("int4_gemv: prefetch and a pipelined K loop (stages > 1) exclude")
    if prefetch and m > 1:  # four rows' accumulators and two tiles spill (sm_90)
        raise ValueError(f"int4_gemv: prefetch is for one row, got {m}")
    n_blocks = triton.cdiv(n, block_n)
    sumsq = out  # unread without a residual
    if residual is not None:
        sumsq = torch.empty((m, n_blocks), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return out if residual is None else AddedResidual(out, sumsq)
    if group_size % block_k or block_k % 8:
        raise ValueError(f"int4_gemv: BLOCK_K {block_k} must divide the group ({group_size})")
    tiles_per_split = max(1, triton.cdiv(triton.cdiv(k, block_k), split_k))
    part, counters = split_workspace(split_k, m, n, n_blocks, out)
    norm_w, norm_sumsq, eps, parts = norm_args(norm, out)
    flag = pdl.use_pdl(x)
    _int4_gemv_kernel[(n_blocks, split_k)](
        x, qweight, zeros, scales, qweight if perm is None else perm,
        out if bias is None else bias, out, part, counters,
        out if residual is None else residual, sumsq, norm_w, norm_sumsq, parts, eps,
        m, n, k, x.stride(0), tiles_per_split,
        HAS_BIAS=bias is not None, HAS_PERM=perm is not None, SILU_MUL=silu_mul,
        NORM=norm is not None, BLOCK_P=triton.next_power_of_2(parts),
        RESIDUAL=residual is not None, SPLIT_K=split_k,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_TILES=group_size // block_k, SUB_N=min(32, block_n), USE_PDL=flag,
        PREFETCH=prefetch, STAGES=stages,
        num_warps=launch[0] if launch else 4, launch_pdl=flag,
    )  # fmt: skip
    return out if residual is None else AddedResidual(out, sumsq)
