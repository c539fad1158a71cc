"""A sparse MoE block for a few rows (decode) in three Triton launches: `route`, then `experts`
(gate_up, down).

Decode reads each chosen expert's weights once and does little math, so the experts run as
GEMVs over the chosen experts only (the tiles of the dense decode GEMV, `gemv.gemv_tile`), and
what lies between them folds into their prologues and epilogues:

- `route`: each program computes the router logits of a block of experts for every row
  (normalizing x as it loads it when x is a `DeferredNorm`, as the dense GEMVs do), rounded to
  the model dtype as `F.linear` rounds them; the last program to finish (an arrival counter,
  `counters.py`) takes every row's logits through softmax, top-k (ties go to the lower expert
  id), renormalization and scaling. No sort, no torch op between the launches.
- `experts`: a row's `top_k` (row, expert) pairs are numbered `pair = row * top_k + slot`; a
  program takes one pair and one block of output features. Rows that chose the same expert
  share the program of that expert's first pair (later pairs' programs do nothing), so every
  chosen expert's weights are read once whatever the row count. gate_up writes each row's
  `[gate | up]` for that expert; down applies SiLU*mul as it loads them (as the dense MLP's
  down GEMV does), scales by the routing weight and stores each pair's fp32 output; the last
  program of a feature block to arrive sums each row's pairs in slot order (a row's sum does not
  depend on the other rows), adds the residual and writes the sums of squares the next GEMV's
  deferred RMSNorm needs (`AddedResidual`).

Shapes come from the rows and the config alone (no host read), so calls are captured in CUDA
graphs; the launches take programmatic dependent launch where `pdl.use_pdl` says so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv import (
    MAX_ROWS,
    TILE_ELEMENTS,
    WEIGHT_EVICTION,
    GemvConfig,
    gemv_tile,
    num_sms,
    row_rstd,
    store_out,
)
from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm


@triton.jit
def _norm_tile(norm_w_ptr, k, K, NORM: tl.constexpr):
    """The RMSNorm weight at `k` (fp32; zeros without NORM)."""
    wn = tl.zeros(k.shape, dtype=tl.float32)
    if NORM:
        wn = tl.load(norm_w_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return wn


@triton.jit
def _softmax_top_k(logits_ptr, weights_ptr, ids_ptr, scaling, offs_m, M, E,
                   RENORMALIZE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Each row's `TOP_K` experts from its fp32 logits `[M, E]`: softmax over all of them, the
    best left slot by slot (the lowest id on ties), renormalized, times `scaling`."""
    offs_e = tl.arange(0, BLOCK_E)
    rows, cols = offs_m[:, None] < M, offs_e[None, :] < E
    logits = tl.load(logits_ptr + offs_m[:, None] * E + offs_e[None, :], mask=rows & cols,
                     other=0.0, cache_modifier=".cg")  # fmt: skip
    logits = tl.where(cols, logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = tl.where(cols, probs / tl.sum(probs, 1)[:, None], -1.0)  # padding: never chosen
    offs_j = tl.arange(0, BLOCK_J)
    top_w = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # slot j: the best expert left (the lowest id on ties)
        best = tl.argmax(probs, 1, tie_break_left=True)  # [BLOCK_M]
        best = tl.minimum(best, E - 1)  # a NaN row (graph padding) still names an expert
        top_w = tl.where(offs_j[None, :] == j, tl.max(probs, 1)[:, None], top_w)
        top_id = tl.where(offs_j[None, :] == j, best[:, None], top_id)
        probs = tl.where(offs_e[None, :] == best[:, None], -1.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]
    out = offs_m[:, None] * TOP_K + offs_j[None, :]
    mask = rows & (offs_j[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w * scaling, mask=mask)
    tl.store(ids_ptr + out, top_id, mask=mask)


@triton.jit(do_not_specialize=["M", "norm_parts"])
def _route_kernel(
    x_ptr,  # [M, K] (NORM: before the RMSNorm)
    w_ptr,  # [E, K] router weight
    logits_ptr,  # fp32 [M, E] workspace
    counter_ptr,  # int32 [1], zero between calls
    weights_ptr,  # fp32 [M, TOP_K] out
    ids_ptr,  # int32 [M, TOP_K] out
    norm_w_ptr,  # [K] RMSNorm weight (NORM)
    norm_sumsq_ptr,  # fp32 [M, norm_parts]: x's sums of squares (NORM)
    norm_parts,
    eps,
    scaling,
    M,
    E,
    K,
    stride_xm,
    NORM: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_J: tl.constexpr,  # TOP_K padded to a power of 2
    BLOCK_E: tl.constexpr,  # E padded to a power of 2
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program n: logits of experts [n * BLOCK_N, (n + 1) * BLOCK_N) for every row; the last
    program to arrive picks each row's experts. The first weight tile loads before the PDL wait."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < E
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0,
                eviction_policy=WEIGHT_EVICTION)  # fmt: skip
    pdl.wait(USE_PDL)
    rstd = row_rstd(norm_sumsq_ptr, norm_parts, eps, offs_m, M, K, NORM, BLOCK_P)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [experts, rows]
    acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, offs_k, offs_m, rstd,
                    _norm_tile(norm_w_ptr, offs_k, K, NORM), BLOCK_M, False, NORM)  # fmt: skip
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0,
                    eviction_policy=WEIGHT_EVICTION)  # fmt: skip
        acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, k, offs_m, rstd,
                        _norm_tile(norm_w_ptr, k, K, NORM), BLOCK_M, False, NORM)  # fmt: skip
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.linear's output
    mask = (offs_m[None, :] < M) & n_mask[:, None]
    tl.store(logits_ptr + offs_m[None, :] * E + offs_n[:, None], logits, mask=mask)
    tl.debug_barrier()  # every thread's logits are written before the counter moves
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:  # every block's logits are in: pick the experts
        _softmax_top_k(logits_ptr, weights_ptr, ids_ptr, scaling, offs_m, M, E, RENORMALIZE,
                       TOP_K, BLOCK_J, BLOCK_E, BLOCK_M)  # fmt: skip
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _expert_rows(ids_ptr, pair, M, offs_m, TOP_K: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_PAIRS: tl.constexpr):  # fmt: skip
    """`pair`'s expert (int64); whether `pair` is the first to choose it (its program serves
    every row that did); `chosen [BLOCK_M, BLOCK_J]`: row m's slot j holds that expert;
    `slots`: the pair number of each (m, j). A row's experts are distinct."""
    expert = tl.load(ids_ptr + pair)
    offs_p = tl.arange(0, BLOCK_PAIRS)
    earlier = tl.load(ids_ptr + offs_p, mask=offs_p < pair, other=-1)
    first = tl.sum((earlier == expert).to(tl.int32), 0) == 0
    offs_j = tl.arange(0, BLOCK_J)
    slots = offs_m[:, None] * TOP_K + offs_j[None, :]
    valid = (offs_m[:, None] < M) & (offs_j[None, :] < TOP_K)
    chosen = valid & (tl.load(ids_ptr + slots, mask=valid, other=-1) == expert)
    return expert.to(tl.int64), first, chosen, slots


@triton.jit(do_not_specialize=["M", "norm_parts"])
def _gate_up_kernel(
    x_ptr,  # [M, K] (NORM: before the RMSNorm)
    w_ptr,  # [E, N, K] gate_up (`[gate | up]` rows), contiguous
    out_ptr,  # [M * TOP_K, M, N]: (p, m) = row m's [gate | up] through pair p's expert
    ids_ptr,  # int32 [M, TOP_K]
    norm_w_ptr,
    norm_sumsq_ptr,
    norm_parts,
    eps,
    M,
    N,
    K,
    stride_xm,
    NORM: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,  # M * TOP_K padded to a power of 2
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (pair, n block): the gate_up features of the block for every row that chose
    the pair's expert, if the pair is that expert's first."""
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    pdl.wait(USE_PDL)  # the expert ids come from the kernel before
    expert, first, chosen, _ = _expert_rows(ids_ptr, pair, M, offs_m, TOP_K, BLOCK_J, BLOCK_PAIRS)
    if first:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        w_rows = w_ptr + expert * N * K + offs_n.to(tl.int64)[:, None] * K
        rstd = row_rstd(norm_sumsq_ptr, norm_parts, eps, offs_m, M, K, NORM, BLOCK_P)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0,
                        eviction_policy=WEIGHT_EVICTION)  # fmt: skip
            acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, k, offs_m, rstd,
                            _norm_tile(norm_w_ptr, k, K, NORM), BLOCK_M, False, NORM)  # fmt: skip
        has = tl.max(chosen.to(tl.int32), 1) > 0  # [BLOCK_M]
        rows = pair * M + offs_m
        tl.store(out_ptr + rows.to(tl.int64)[None, :] * N + offs_n[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=has[None, :] & n_mask[:, None])  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _down_kernel(
    h_ptr,  # [M * TOP_K, M, 2K] from _gate_up_kernel
    w_ptr,  # [E, N, K] down, contiguous
    part_ptr,  # fp32 [M * TOP_K, N]: each pair's weighted output
    counter_ptr,  # int32 per n block, zero between calls
    ids_ptr,  # int32 [M, TOP_K]
    weights_ptr,  # fp32 [M, TOP_K]
    res_ptr,  # [M, N] residual stream (RESIDUAL)
    out_ptr,  # [M, N]
    sumsq_ptr,  # fp32 [M, n blocks] out (RESIDUAL)
    M,
    N,
    K,
    RESIDUAL: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (pair, n block): if the pair is its expert's first, the down features of the
    block for every row that chose it, times the routing weight, into `part` at that row's
    pair; then the block's last program sums the pairs per row (slot order) + the residual."""
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    pdl.wait(USE_PDL)
    expert, first, chosen, slots = _expert_rows(ids_ptr, pair, M, offs_m, TOP_K, BLOCK_J,
                                                BLOCK_PAIRS)  # fmt: skip
    if first:
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + expert * N * K + offs_n.to(tl.int64)[:, None] * K
        x_rows = h_ptr + pair.to(tl.int64) * M * 2 * K  # [M, 2K]: rows m of this expert
        no_rstd, no_wn = tl.zeros((BLOCK_M,), tl.float32), tl.zeros((BLOCK_K,), tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0,
                        eviction_policy=WEIGHT_EVICTION)  # fmt: skip
            acc = gemv_tile(
                acc, w, x_rows, M, K, 2 * K, k, offs_m, no_rstd, no_wn, BLOCK_M, True, False
            )  # SiLU*mul as it loads the [gate | up] rows
        routing = tl.sum(tl.load(weights_ptr + slots, mask=chosen, other=0.0), 1)  # [BLOCK_M]
        dest = tl.sum(tl.where(chosen, slots, 0), 1)  # each row's pair of this expert
        has = tl.max(chosen.to(tl.int32), 1) > 0
        tl.store(part_ptr + dest.to(tl.int64)[None, :] * N + offs_n[:, None],
                 acc * routing[None, :], mask=has[None, :] & n_mask[:, None])  # fmt: skip
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:  # every pair's block is in: sum per row, slot order
        out_offs = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] -> out[m, f]
        out_mask = (offs_m[None, :] < M) & n_mask[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            part = part_ptr + (offs_m * TOP_K + j).to(tl.int64)[None, :] * N + offs_n[:, None]
            acc += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
        r = acc
        if RESIDUAL:
            r = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0)
        # no LoRA delta here (`acc` fills the unread argument)
        store_out(acc, out_ptr, r, sumsq_ptr, out_offs, out_mask, offs_m, M, pid_n,
                  tl.num_programs(1), acc, RESIDUAL, False)  # fmt: skip
        tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")


def router_config(num_experts: int, k: int, is_cuda: bool) -> GemvConfig:
    """Feature block of the routing launch: a few experts per program, long K tiles."""
    if not is_cuda:  # interpreter: small tiles so test shapes span several
        return GemvConfig(block_n=2, block_k=32)
    block_n = 4 if num_experts >= 128 else 2 if num_experts >= 32 else 1
    return GemvConfig(block_n=block_n, block_k=min(2048, triton.next_power_of_2(k)))


def expert_config(num_pairs: int, n: int, k: int, sms: int, is_cuda: bool) -> GemvConfig:
    """One expert launch: the widest feature block (32 .. 4) that still gives ~4 programs per
    SM over the pairs, weight tiles of `TILE_ELEMENTS`."""
    if not is_cuda:
        return GemvConfig(block_n=16, block_k=32)
    block_n = next((b for b in (32, 16, 8) if num_pairs * triton.cdiv(n, b) >= 4 * sms), 4)
    block_k = min(TILE_ELEMENTS // block_n, max(16, triton.next_power_of_2(k)))
    return GemvConfig(block_n=block_n, block_k=block_k)


def _rows(x, weight: torch.Tensor, what: str):
    """(the DeferredNorm or None, the rows) of x, checked against a `[..., K]` weight."""
    norm = x if isinstance(x, DeferredNorm) else None
    rows = norm.h if norm is not None else x
    if rows.dim() != 2 or rows.shape[0] > MAX_ROWS or rows.shape[1] != weight.shape[-1]:
        raise ValueError(f"moe decode {what}: x must be [M <= {MAX_ROWS}, "
                         f"{weight.shape[-1]}], got {tuple(rows.shape)}")  # fmt: skip
    if rows.dtype != weight.dtype or not weight.is_contiguous():
        raise ValueError(f"moe decode {what}: x {rows.dtype} and contiguous weights "
                         f"{weight.dtype} of one dtype")  # fmt: skip
    return norm, rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_args(norm: DeferredNorm | None, unused: torch.Tensor) -> tuple:
    """(norm weight, sums of squares, their count per row, eps); `unused` without a norm."""
    if norm is None:
        return unused, unused, 1, 0.0
    return norm.weight, norm.sumsq, norm.sumsq.shape[1], norm.eps


def route(
    x,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    scaling: float = 1.0,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing in one launch: (weights fp32 `[M, top_k]`, expert ids int32
    `[M, top_k]`), slots by decreasing weight, ties to the lower expert id.

    x: `[M <= MAX_ROWS, H]` or a `DeferredNorm` of such (normalized as it loads); weight: the
    router `[E, H]` in x's dtype. Logits are rounded to x's dtype (as `F.linear`), softmax over
    all experts in fp32, `renormalize`: the chosen weights divided by their sum; then * scaling.
    """
    norm, rows = _rows(x, weight, "route")
    m, k = rows.shape
    num_experts = weight.shape[0]
    weights = torch.empty((m, top_k), dtype=torch.float32, device=rows.device)
    ids = torch.empty((m, top_k), dtype=torch.int32, device=rows.device)
    if m == 0:
        return weights, ids
    logits = torch.empty((m, num_experts), dtype=torch.float32, device=rows.device)
    norm_w, norm_sumsq, parts, eps = _norm_args(norm, rows)
    cfg = config or router_config(num_experts, k, rows.is_cuda)
    flag = pdl.use_pdl(rows)
    _route_kernel[(triton.cdiv(num_experts, cfg.block_n),)](
        rows, weight, logits, arrival_counters(rows.device, 1), weights, ids,
        norm_w, norm_sumsq, parts, eps, scaling, m, num_experts, k, rows.stride(0),
        NORM=norm is not None, RENORMALIZE=renormalize, TOP_K=top_k,
        BLOCK_J=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_P=triton.next_power_of_2(parts), BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, WEIGHT_EVICTION=WEIGHT_EVICTION,
        USE_PDL=flag, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=flag,
    )  # fmt: skip
    return weights, ids


def experts(
    x,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    residual: torch.Tensor | None = None,
    configs: tuple[GemvConfig, GemvConfig] | None = None,
):
    """`sum_j weights[m, j] * down[e] @ (silu(gate[e] @ x[m]) * up[e] @ x[m])`, `e = ids[m, j]`,
    in two launches; each chosen expert's weights are read once.

    x: `[M <= MAX_ROWS, H]` or a `DeferredNorm` of such; gate_up `[E, 2I, H]`, down `[E, H, I]`
    (contiguous, x's dtype); weights / ids `[M, top_k]` (a row's experts distinct). Returns
    `[M, H]` in x's dtype, or with `residual [M, H]`: `AddedResidual(out + residual, sums of
    squares)` as `gemv` does. `configs`: (gate_up's, down's) launch; default `expert_config`.
    """
    norm, rows = _rows(x, gate_up, "experts")
    m, hidden = rows.shape
    two_inter, inter = gate_up.shape[1], down.shape[2]
    if down.shape != (gate_up.shape[0], hidden, two_inter // 2) or not down.is_contiguous():
        raise ValueError(f"moe decode experts: down {tuple(down.shape)} does not match "
                         f"gate_up {tuple(gate_up.shape)}")  # fmt: skip
    if residual is not None and (residual.shape != (m, hidden) or not residual.is_contiguous()):
        raise ValueError(f"moe decode residual must be contiguous [{m}, {hidden}]")
    top_k = ids.shape[1]
    num_pairs = m * top_k
    ids = ids.to(torch.int32).contiguous()  # no copy when it comes from `route`
    weights = weights.to(torch.float32).contiguous()
    device = rows.device
    gate_up_cfg, down_cfg = configs or (
        expert_config(num_pairs, two_inter, hidden, num_sms(device), rows.is_cuda),
        expert_config(num_pairs, hidden, inter, num_sms(device), rows.is_cuda),
    )
    out = torch.empty((m, hidden), dtype=rows.dtype, device=device)
    n_blocks = triton.cdiv(hidden, down_cfg.block_n)
    sumsq = out  # unread without a residual
    if residual is not None:
        sumsq = torch.empty((m, n_blocks), dtype=torch.float32, device=device)
    if m == 0:
        return out if residual is None else AddedResidual(out, sumsq)
    gate_up_rows = torch.empty((num_pairs, m, two_inter), dtype=rows.dtype, device=device)
    part = torch.empty((num_pairs, hidden), dtype=torch.float32, device=device)
    norm_w, norm_sumsq, parts, eps = _norm_args(norm, rows)
    flag = pdl.use_pdl(rows)
    pairs = dict(TOP_K=top_k, BLOCK_J=triton.next_power_of_2(top_k),
                 BLOCK_PAIRS=triton.next_power_of_2(num_pairs), BLOCK_M=triton.next_power_of_2(m),
                 WEIGHT_EVICTION=WEIGHT_EVICTION, USE_PDL=flag, launch_pdl=flag)  # fmt: skip
    _gate_up_kernel[(num_pairs, triton.cdiv(two_inter, gate_up_cfg.block_n))](
        rows, gate_up, gate_up_rows, ids, norm_w, norm_sumsq, parts, eps,
        m, two_inter, hidden, rows.stride(0), NORM=norm is not None,
        BLOCK_P=triton.next_power_of_2(parts), BLOCK_N=gate_up_cfg.block_n,
        BLOCK_K=gate_up_cfg.block_k, num_warps=gate_up_cfg.num_warps,
        num_stages=gate_up_cfg.num_stages, **pairs,
    )  # fmt: skip
    res = residual if residual is not None else out  # unread without RESIDUAL
    _down_kernel[(num_pairs, n_blocks)](
        gate_up_rows, down, part, arrival_counters(device, n_blocks), ids, weights, res, out,
        sumsq, m, hidden, inter, RESIDUAL=residual is not None, BLOCK_N=down_cfg.block_n,
        BLOCK_K=down_cfg.block_k, num_warps=down_cfg.num_warps,
        num_stages=down_cfg.num_stages, **pairs,
    )  # fmt: skip
    return out if residual is None else AddedResidual(out, sumsq)
