"""The tiles of a decode MoE block's expert GEMVs, shared by `moe_decode`'s two expert launches
and `moe_layer`'s one persistent launch: the chosen expert's weight rows (routed or shared),
the K loop over them (`gemv.gemv_tile`, its folds), the stores between gate_up and down and the
final per-row sum of the pairs."""

from __future__ import annotations

import triton
import triton.language as tl

from polymodal.llm_core.layers.gemv import gemv_tile, store_out
from polymodal.llm_core.layers.moe_route import norm_tile


@triton.jit
def weight_tile(w_rows, k, n_mask, K, WEIGHT_EVICTION: tl.constexpr):
    """The `[BLOCK_N, BLOCK_K]` weight tile at columns `k` of the rows `w_rows` (0 past K)."""
    return tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0,
                   eviction_policy=WEIGHT_EVICTION)  # fmt: skip


@triton.jit
def gate_up_rows(w_ptr, shared_ptr, expert, offs_n, E, N, K, num_shared):
    """Pointers to the gate_up weight rows `offs_n` of `expert` (`[BLOCK_N, 1]`): routed
    `[E, N, K]`, or shared expert s = expert - E: gate rows s * I + f, up rows
    S * I + s * I + f - I of the shared MLP's `[2 * S * I, K]`."""
    if expert < E:
        w_rows = w_ptr + expert * N * K + offs_n.to(tl.int64)[:, None] * K
    else:
        inter = N // 2
        up_skip = tl.where(offs_n >= inter, num_shared - 1, 0) * inter  # past other gates
        row = offs_n + (expert - E) * inter + up_skip
        w_rows = shared_ptr + row.to(tl.int64)[:, None] * K
    return w_rows


@triton.jit
def down_rows(w_ptr, shared_ptr, expert, offs_n, E, N, K, num_shared):
    """Pointers to the down weight rows `offs_n` of `expert` (`[BLOCK_N, 1]`): routed
    `[E, N, K]`, or shared expert s: columns `[s * K, (s + 1) * K)` of the shared `[N, S * K]`."""
    if expert < E:
        w_rows = w_ptr + expert * N * K + offs_n.to(tl.int64)[:, None] * K
    else:
        w_rows = shared_ptr + offs_n.to(tl.int64)[:, None] * (num_shared * K) + (expert - E) * K
    return w_rows


@triton.jit
def expert_gemv(w, w_rows, n_mask, x_ptr, M, K, stride_xm, offs_m, rstd, norm_w_ptr,
                SILU_MUL: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_EVICTION: tl.constexpr,
                PREFETCH: tl.constexpr, STAGES: tl.constexpr = 1):  # fmt: skip
    """`[BLOCK_N, BLOCK_M]` fp32: the weight rows `w_rows` (their first K tile `w` loaded)
    times every x row (`gemv_tile`'s folds). PREFETCH: each next weight tile loads before the
    current one is used (two in flight, in registers); STAGES > 1: the K loop's tiles stream
    through shared memory (`cp.async`), STAGES - 1 ahead (a plain `range` is not pipelined)."""
    offs_k = tl.arange(0, BLOCK_K)
    w_next = w
    if PREFETCH:
        w_next = weight_tile(w_rows, BLOCK_K + offs_k, n_mask, K, WEIGHT_EVICTION)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, offs_k, offs_m, rstd,
                    norm_tile(norm_w_ptr, offs_k, K, NORM), BLOCK_M, SILU_MUL, NORM)  # fmt: skip
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        k = k0 + offs_k
        if PREFETCH:
            w = w_next
            w_next = weight_tile(w_rows, k + BLOCK_K, n_mask, K, WEIGHT_EVICTION)
        else:
            w = weight_tile(w_rows, k, n_mask, K, WEIGHT_EVICTION)
        acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, k, offs_m, rstd,
                        norm_tile(norm_w_ptr, k, K, NORM), BLOCK_M, SILU_MUL, NORM)  # fmt: skip
    return acc


@triton.jit
def store_gate_up(out_ptr, acc, pair, chosen, M, N, offs_m, offs_n, n_mask):
    """Row m's `[gate | up]` block through `pair`'s expert at `out[pair, m]`, for the rows
    that chose it."""
    has = tl.max(chosen.to(tl.int32), 1) > 0  # [BLOCK_M]
    rows = pair * M + offs_m
    tl.store(out_ptr + rows.to(tl.int64)[None, :] * N + offs_n[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=has[None, :] & n_mask[:, None])  # fmt: skip


@triton.jit
def store_down_part(part_ptr, acc, routing, chosen, slots, N, offs_n, n_mask):
    """A down block times each row's routing weight, into `part` at the row's pair of this
    expert, for the rows that chose it."""
    dest = tl.sum(tl.where(chosen, slots, 0), 1)  # each row's pair of this expert
    has = tl.max(chosen.to(tl.int32), 1) > 0
    tl.store(part_ptr + dest.to(tl.int64)[None, :] * N + offs_n[:, None],
             acc * routing[None, :], mask=has[None, :] & n_mask[:, None])  # fmt: skip


@triton.jit
def sum_pairs(part_ptr, r, out_ptr, sumsq_ptr, offs_m, offs_n, M, N, pid_n, n_blocks,
              RESIDUAL: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_M: tl.constexpr):  # fmt: skip
    """Feature block `pid_n` of every row: its pairs' parts summed in slot order, + the residual
    rows `r` and the sums of squares (RESIDUAL), stored."""
    out_offs = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] -> out[m, f]
    out_mask = (offs_m[None, :] < M) & (offs_n < N)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        part = part_ptr + (offs_m * SLOTS + j).to(tl.int64)[None, :] * N + offs_n[:, None]
        acc += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
    # no LoRA delta here (`acc` fills the unread argument)
    store_out(acc, out_ptr, r, sumsq_ptr, out_offs, out_mask, offs_m, M, pid_n, n_blocks, acc,
              RESIDUAL, False, RESIDUAL)  # fmt: skip
