"""MoE routing for a few rows (decode) in one Triton launch: `route`, the first of the three
launches of `moe_decode` (the experts' two follow there).

Each program computes the router logits of a block of experts for every row (normalizing x as
it loads it when x is a `DeferredNorm`, as the dense GEMVs do), fp32 dots rounded to the model
dtype as `F.linear` rounds them, or left in fp32 where the torch router computes its logits in
fp32 (DeepSeek-V3). The last program to finish (an arrival counter, `counters.py`) turns every
row's logits into its experts and weights, as `moe.route` does:

- softmax (Mixtral, Qwen3-MoE): softmax over all experts, top-k, renormalized or not.
- sigmoid (DeepSeek-V3): sigmoid scores; the choice ranks scores + the correction bias; with
  groups, each group is ranked by the sum of its two best biased scores and only the best
  `topk_groups` groups' experts compete; the weights are the chosen experts' unbiased scores,
  divided by their sum + 1e-20 when renormalized.

Then times `scaling`. Slots come by decreasing (biased) score; exact ties go to the lower expert
(group) id: a rule of ours, since torch's top-k leaves the order of ties unspecified. Shared
experts (`shared_experts`) follow the routed slots as ids `E, E + 1, ...` with weight 1, so one
pair of expert launches runs routed and shared experts alike. No sort, no torch op between the
launches, no host read: calls are captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv import (
    MAX_ROWS,
    WEIGHT_EVICTION,
    GemvConfig,
    gemv_tile,
)
from polymodal.llm_core.layers.gemv_folds import row_rstd
from polymodal.llm_core.layers.norm import DeferredNorm, plain

SCORINGS = ("softmax", "sigmoid")
# larger than any expert id: loses every "lowest id" contest (a global a kernel reads must be a
# constexpr)
_NO_ID = tl.constexpr(1 << 30)


@triton.jit
def norm_tile(norm_w_ptr, k, K, NORM: tl.constexpr):
    """The RMSNorm weight at `k` (fp32; zeros without NORM)."""
    wn = tl.zeros(k.shape, dtype=tl.float32)
    if NORM:
        wn = tl.load(norm_w_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return wn


@triton.jit
def store_slots(weights_ptr, ids_ptr, top_w, top_id, offs_m, M, SLOTS: tl.constexpr,
                BLOCK_J: tl.constexpr):  # fmt: skip
    """Each row's `SLOTS` weights and ids (`[BLOCK_M, BLOCK_J]`, from `pick_experts`)."""
    offs_j = tl.arange(0, BLOCK_J)[None, :]
    out = offs_m[:, None] * SLOTS + offs_j
    mask = (offs_m[:, None] < M) & (offs_j < SLOTS)
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(ids_ptr + out, top_id, mask=mask)


@triton.jit
def _softmax_top_k(logits_ptr, offs_m, M, E, RENORMALIZE: tl.constexpr, TOP_K: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_M: tl.constexpr):  # fmt: skip
    """Each row's `TOP_K` experts from its fp32 logits `[M, E]`: softmax over all of them, the
    best left slot by slot (the lowest id on ties), renormalized: (weights, ids).

    One reduction a slot: each expert is an int64 key, its probability's bits (a float >= 0
    orders as its bits do) over `_NO_ID - id` (the lower id is the larger key on a tie); the
    row's max key is the slot's expert and weight at once. A NaN probability (graph padding)
    keys as 0, so such a row still names distinct experts; a taken or padding expert is -1."""
    offs_e = tl.arange(0, BLOCK_E)
    rows, cols = offs_m[:, None] < M, offs_e[None, :] < E
    logits = tl.load(logits_ptr + offs_m[:, None] * E + offs_e[None, :], mask=rows & cols,
                     other=0.0, cache_modifier=".cg")  # fmt: skip
    logits = tl.where(cols, logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = probs / tl.sum(probs, 1)[:, None]
    bits = tl.where(probs == probs, probs, 0.0).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(cols, (bits << 32) | (-offs_e[None, :] + _NO_ID).to(tl.int64), -1)
    offs_j = tl.arange(0, BLOCK_J)
    top_w = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # slot j: the best expert left (the lowest id on ties)
        best = tl.max(key, 1)  # [BLOCK_M]
        best_id = -best.to(tl.int32) + _NO_ID  # the low half (the cast truncates)
        best_w = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        top_w = tl.where(offs_j[None, :] == j, best_w[:, None], top_w)
        top_id = tl.where(offs_j[None, :] == j, best_id[:, None], top_id)
        key = tl.where(offs_e[None, :] == best_id[:, None], -1, key)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]
    return top_w, top_id


@triton.jit
def _sigmoid_grouped_top_k(logits_ptr, bias_ptr, offs_m, M, E, group_size, BIAS: tl.constexpr,
                           RENORMALIZE: tl.constexpr, TOP_K: tl.constexpr,
                           NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                           BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_M: tl.constexpr):  # fmt: skip
    """DeepSeek-V3's choice from fp32 logits `[M, E]`, held as `[rows, groups, experts of the
    group]`: sigmoid scores, + bias for the choice, the best `TOPK_GROUPS` groups by the sum of
    their two best, then the `TOP_K` best experts of those (lowest ids on ties; a NaN row still
    names distinct experts), weighted by their unbiased scores: (weights, ids)."""
    offs_g = tl.arange(0, BLOCK_G)[None, :, None]
    offs_s = tl.arange(0, BLOCK_S)[None, None, :]
    expert = offs_g * group_size + offs_s  # [1, BLOCK_G, BLOCK_S]
    in_e = (offs_g < NUM_GROUPS) & (offs_s < group_size)
    valid = (offs_m[:, None, None] < M) & in_e  # [BLOCK_M, BLOCK_G, BLOCK_S]
    logits = tl.load(logits_ptr + offs_m[:, None, None] * E + expert, mask=valid, other=0.0,
                     cache_modifier=".cg")  # fmt: skip
    scores = tl.sigmoid(logits)
    choice = scores
    if BIAS:
        choice = choice + tl.load(bias_ptr + expert, mask=in_e, other=0.0)
    choice = tl.where(valid & (choice == choice), choice, float("-inf"))  # NaN: the worst
    if NUM_GROUPS > 1:  # a group's score: its best + its second best (a tie counts twice)
        first = tl.max(choice, 2)  # [BLOCK_M, BLOCK_G]
        at = tl.min(tl.where(choice == first[:, :, None], offs_s, _NO_ID), 2)
        second = tl.max(tl.where(offs_s == at[:, :, None], float("-inf"), choice), 2)
        group_score = first + second
        group = tl.arange(0, BLOCK_G)[None, :]
        kept = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):  # the best group left, the lowest id on ties
            open_ = (group < NUM_GROUPS) & (kept == 0)
            best = tl.max(tl.where(open_, group_score, float("-inf")), 1)
            pick = tl.min(tl.where(open_ & (group_score == best[:, None]), group, _NO_ID), 1)
            kept = tl.where(group == pick[:, None], 1, kept)
        choice = tl.where(kept[:, :, None] != 0, choice, float("-inf"))
    offs_j = tl.arange(0, BLOCK_J)[None, :]
    top_w = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.int32)
    taken = tl.zeros((BLOCK_M, BLOCK_G, BLOCK_S), dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # slot j: the best expert left (the lowest id on ties)
        open_ = in_e & (taken == 0)
        best = tl.max(tl.max(tl.where(open_, choice, float("-inf")), 2), 1)  # [BLOCK_M]
        hit = open_ & (choice == best[:, None, None])
        pick = tl.minimum(tl.min(tl.min(tl.where(hit, expert, _NO_ID), 2), 1), E - 1)
        one = in_e & (expert == pick[:, None, None])  # (padding ids alias real ones)
        weight = tl.sum(tl.sum(tl.where(one, scores, 0.0), 2), 1)
        top_w = tl.where(offs_j == j, weight[:, None], top_w)
        top_id = tl.where(offs_j == j, pick[:, None], top_id)
        taken = tl.where(one, 1, taken)
    if RENORMALIZE:
        top_w = top_w / (tl.sum(top_w, 1)[:, None] + 1e-20)
    return top_w, top_id


@triton.jit
def pick_experts(logits_ptr, bias_ptr, scaling, offs_m, M, E, group_size, SIGMOID: tl.constexpr,
                 BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, TOP_K: tl.constexpr,
                 NUM_SHARED: tl.constexpr, NUM_GROUPS: tl.constexpr,
                 TOPK_GROUPS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_M: tl.constexpr):  # fmt: skip
    """Each row's slots `[TOP_K routed | NUM_SHARED shared]` from the fp32 logits `[M, E]`:
    (weights fp32, ids int32), `[BLOCK_M, BLOCK_J]`; the routed weights times `scaling`, shared
    slot s as expert `E + s - TOP_K` with weight 1."""
    if SIGMOID:
        top_w, top_id = _sigmoid_grouped_top_k(logits_ptr, bias_ptr, offs_m, M, E, group_size,
                                               BIAS, RENORMALIZE, TOP_K, NUM_GROUPS,
                                               TOPK_GROUPS, BLOCK_J, BLOCK_G, BLOCK_S,
                                               BLOCK_M)  # fmt: skip
    else:
        top_w, top_id = _softmax_top_k(logits_ptr, offs_m, M, E, RENORMALIZE, TOP_K, BLOCK_J,
                                       BLOCK_E, BLOCK_M)  # fmt: skip
    offs_j = tl.arange(0, BLOCK_J)[None, :]
    shared = offs_j >= TOP_K
    return tl.where(shared, 1.0, top_w * scaling), tl.where(shared, E + offs_j - TOP_K, top_id)


@triton.jit
def router_logits(w, w_rows, n_mask, x_ptr, logits_ptr, offs_n, offs_m, rstd, norm_w_ptr, M, E,
                  K, stride_xm, NORM: tl.constexpr, FP32_LOGITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  WEIGHT_EVICTION: tl.constexpr):  # fmt: skip
    """Stores the logits of experts `offs_n` (rows `w_rows` of the router, the first K tile `w`
    already loaded) for every row: fp32 dots, rounded to x's dtype unless FP32_LOGITS."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [experts, rows]
    acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, offs_k, offs_m, rstd,
                    norm_tile(norm_w_ptr, offs_k, K, NORM), BLOCK_M, False, NORM)  # fmt: skip
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0,
                    eviction_policy=WEIGHT_EVICTION)  # fmt: skip
        acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, k, offs_m, rstd,
                        norm_tile(norm_w_ptr, k, K, NORM), BLOCK_M, False, NORM)  # fmt: skip
    logits = acc
    if not FP32_LOGITS:
        logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.linear's output
    mask = (offs_m[None, :] < M) & n_mask[:, None]
    tl.store(logits_ptr + offs_m[None, :] * E + offs_n[:, None], logits, mask=mask)


@triton.jit(do_not_specialize=["M", "norm_parts"])
def _route_kernel(
    x_ptr,  # [M, K] (NORM: before the RMSNorm)
    w_ptr,  # [E, K] router weight
    bias_ptr,  # fp32 [E] correction bias (BIAS)
    logits_ptr,  # fp32 [M, E] workspace
    counter_ptr,  # int32 [1], zero between calls
    weights_ptr,  # fp32 [M, TOP_K + NUM_SHARED] out
    ids_ptr,  # int32 [M, TOP_K + NUM_SHARED] out
    norm_w_ptr,  # [K] RMSNorm weight (NORM)
    norm_sumsq_ptr,  # fp32 [M, norm_parts]: x's sums of squares (NORM)
    norm_parts,
    eps,
    scaling,
    M,
    E,
    K,
    group_size,  # E // NUM_GROUPS
    stride_xm,
    NORM: tl.constexpr,
    SIGMOID: tl.constexpr,
    FP32_LOGITS: tl.constexpr,  # no rounding to the model dtype
    BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BLOCK_J: tl.constexpr,  # TOP_K + NUM_SHARED padded to a power of 2
    BLOCK_E: tl.constexpr,  # E padded to a power of 2
    BLOCK_G: tl.constexpr,  # NUM_GROUPS padded to a power of 2
    BLOCK_S: tl.constexpr,  # group_size padded to a power of 2
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
    router_logits(w, w_rows, n_mask, x_ptr, logits_ptr, offs_n, offs_m, rstd, norm_w_ptr, M, E,
                  K, stride_xm, NORM, FP32_LOGITS, BLOCK_N, BLOCK_M, BLOCK_K,
                  WEIGHT_EVICTION)  # fmt: skip
    tl.debug_barrier()  # every thread's logits are written before the counter moves
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:  # every block's logits are in: pick the experts
        top_w, top_id = pick_experts(logits_ptr, bias_ptr, scaling, offs_m, M, E, group_size,
                                     SIGMOID, BIAS, RENORMALIZE, TOP_K, NUM_SHARED, NUM_GROUPS,
                                     TOPK_GROUPS, BLOCK_J, BLOCK_E, BLOCK_G, BLOCK_S,
                                     BLOCK_M)  # fmt: skip
        store_slots(weights_ptr, ids_ptr, top_w, top_id, offs_m, M, TOP_K + NUM_SHARED, BLOCK_J)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


def router_config(num_experts: int, k: int, is_cuda: bool) -> GemvConfig:
    """Feature block of the routing launch. K in one tile (<= 2048, Qwen3-30B-A3B's router):
    one expert a program in one warp, so every reduction, the last program's top-k included,
    stays in the warp (shuffles: 4 barriers in the kernel where 4 warps of 4 experts had 29,
    and 53 before the one-reduction top-k; not yet timed on a GPU: `bench_moe.py --sweep`).
    Longer K: a few experts a program, long K tiles."""
    if not is_cuda:  # interpreter: small tiles so test shapes span several
        return GemvConfig(block_n=2, block_k=32)
    if k <= 2048 and num_experts >= 32:
        return GemvConfig(block_n=1, block_k=max(16, triton.next_power_of_2(k)), num_warps=1)
    block_n = 4 if num_experts >= 128 else 2 if num_experts >= 32 else 1
    return GemvConfig(block_n=block_n, block_k=min(2048, triton.next_power_of_2(k)))


def decode_rows(x, weight: torch.Tensor, what: str):
    """(the DeferredNorm or None, the rows) of x, checked against a `[..., K]` weight (a
    Gemma unit-offset norm materialized: not one these kernels fold)."""
    x = plain(x)
    norm = x if isinstance(x, DeferredNorm) else None
    rows = norm.h if norm is not None else x
    if rows.dim() != 2 or rows.shape[0] > MAX_ROWS or rows.shape[1] != weight.shape[-1]:
        raise ValueError(f"moe decode {what}: x must be [M <= {MAX_ROWS}, "
                         f"{weight.shape[-1]}], got {tuple(rows.shape)}")  # fmt: skip
    if rows.dtype != weight.dtype or not weight.is_contiguous():
        raise ValueError(f"moe decode {what}: x {rows.dtype} and contiguous weights "
                         f"{weight.dtype} of one dtype")  # fmt: skip
    return norm, rows if rows.stride(-1) == 1 else rows.contiguous()


def norm_args(norm: DeferredNorm | None, unused: torch.Tensor) -> tuple:
    """(norm weight, sums of squares, their count per row, eps); `unused` without a norm."""
    if norm is None:
        return unused, unused, 1, 0.0
    return norm.weight, norm.sumsq, norm.sumsq.shape[1], norm.eps


def check_scoring(scoring, num_experts, top_k, bias, num_groups, topk_groups) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"moe decode route: scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "softmax" and (bias is not None or num_groups != 1):
        raise ValueError("moe decode route: a correction bias and groups need sigmoid scoring")
    if bias is not None and (bias.shape != (num_experts,) or bias.dtype != torch.float32):
        raise ValueError(f"moe decode route: correction bias must be fp32 [{num_experts}], got "
                         f"{bias.dtype} {tuple(bias.shape)}")  # fmt: skip
    size = num_experts // max(num_groups, 1)
    grouped_ok = num_groups == 1 or (size * num_groups == num_experts and size >= 2
                                     and 1 <= topk_groups <= num_groups)  # fmt: skip
    if not grouped_ok or not 1 <= top_k <= (size * topk_groups if num_groups > 1 else num_experts):
        raise ValueError(f"moe decode route: {num_experts} experts in {num_groups} groups "
                         f"(keep {topk_groups}) cannot give top_k={top_k}")  # fmt: skip


def route(
    x,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    scaling: float = 1.0,
    config: GemvConfig | None = None,
    *,
    scoring: str = "softmax",
    fp32_logits: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing in one launch: (weights fp32 `[M, top_k + shared_experts]`, expert ids
    int32 of the same shape), routed slots by decreasing (biased) score, ties to the lower id,
    then the shared experts as ids `E + s` with weight 1 (what `moe_decode.experts` takes).

    x: `[M <= MAX_ROWS, H]` or a `DeferredNorm` of such (normalized as it loads); weight: the
    router `[E, H]` in x's dtype. Logits: fp32 dots, rounded to x's dtype (as `F.linear`) unless
    `fp32_logits` (as `F.linear(x.float(), weight.float())`). `scoring` "softmax": over all
    experts in fp32; "sigmoid": DeepSeek-V3's choice with the fp32 `correction_bias [E]` and
    `num_groups` / `topk_groups` (see the module docstring). `renormalize`: the chosen weights
    divided by their sum (+ 1e-20 for sigmoid); then * scaling. As `moe.route` computes.
    """
    norm, rows = decode_rows(x, weight, "route")
    m, k = rows.shape
    num_experts = weight.shape[0]
    check_scoring(scoring, num_experts, top_k, correction_bias, num_groups, topk_groups)
    slots = top_k + shared_experts
    weights = torch.empty((m, slots), dtype=torch.float32, device=rows.device)
    ids = torch.empty((m, slots), dtype=torch.int32, device=rows.device)
    if m == 0:
        return weights, ids
    logits = torch.empty((m, num_experts), dtype=torch.float32, device=rows.device)
    norm_w, norm_sumsq, parts, eps = norm_args(norm, rows)
    cfg = config or router_config(num_experts, k, rows.is_cuda)
    flag = pdl.use_pdl(rows)
    group_size = num_experts // num_groups
    _route_kernel[(triton.cdiv(num_experts, cfg.block_n),)](
        rows, weight, correction_bias if correction_bias is not None else logits, logits,
        arrival_counters(rows.device, 1), weights, ids, norm_w, norm_sumsq, parts, eps, scaling,
        m, num_experts, k, group_size, rows.stride(0), NORM=norm is not None,
        SIGMOID=scoring == "sigmoid", FP32_LOGITS=fp32_logits, BIAS=correction_bias is not None,
        RENORMALIZE=renormalize, TOP_K=top_k, NUM_SHARED=shared_experts, NUM_GROUPS=num_groups,
        TOPK_GROUPS=topk_groups, BLOCK_J=triton.next_power_of_2(slots),
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_G=triton.next_power_of_2(num_groups),
        BLOCK_S=triton.next_power_of_2(group_size), BLOCK_P=triton.next_power_of_2(parts),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        WEIGHT_EVICTION=WEIGHT_EVICTION, USE_PDL=flag, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, launch_pdl=flag,
    )  # fmt: skip
    return weights, ids
