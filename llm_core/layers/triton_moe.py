"""Fused MoE experts in Triton: `fused_experts(x, gate_up, down, weights, ids)`.

A token's `top_k` (token, expert) *pairs* are numbered `pair = token * top_k + j`.

- Grouped GEMMs (more than `GEMV_MAX_TOKENS` tokens): `align_pairs` sorts the pairs by expert
  and pads each expert's run to a multiple of `BLOCK_M` (torch ops on the device: no host sync,
  shapes fixed by the token count, so CUDA graphs can capture it). Each program of
  `_grouped_gemm_kernel` takes one `BLOCK_M` block of one expert's pairs and `BLOCK_N` output
  features: gate_up gathers the tokens' rows of x and applies SiLU(gate) * up in its epilogue
  (gate and up feature blocks in one program); down reads the intermediate rows and multiplies
  by the routing weight. Blocks past the last expert's run exit at once. Experts no token chose
  have no block: their weights are never read.
- One token (batch-1 decode): `_pair_gemv_kernel`, one program per (pair, feature block), reads
  only the chosen experts' weights, with the same epilogues; no sorting.

Both end with the pairs' outputs (fp32) summed per token in one reduction, in slot order. fp32
accumulation throughout; the intermediate is stored in the model dtype (as transformers rounds
it). The kernels are not PDL launches: they keep plain stream order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens up to this count take the per-pair GEMV (no sort, no padding to BLOCK_M rows).
GEMV_MAX_TOKENS = 1


@triton.jit
def _epilogue(
    acc, acc_up, weights_ptr, pair, valid, SILU_MUL: tl.constexpr, WEIGHTED: tl.constexpr
):
    if SILU_MUL:  # silu(gate) * up, in fp32
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:  # the routing weight of each pair
        acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    return acc


@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]: x (A_PER_TOKEN: row = pair // TOP_K) or the intermediate (row = pair)
    w_ptr,  # [E, N (x2 with SILU_MUL: gate rows then up rows), K]
    out_ptr,  # [num_pairs, N]
    pairs_ptr,  # int32 [padded]: pair ids sorted by expert, runs padded with num_pairs
    block_expert_ptr,  # int32 [padded / BLOCK_M]: each block's expert, -1 past the last run
    weights_ptr,  # fp32 [num_pairs] (WEIGHTED)
    num_pairs,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    A_PER_TOKEN: tl.constexpr,
    SILU_MUL: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    block, col_block = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = pair < num_pairs
    row = pair // TOP_K if A_PER_TOKEN else pair
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row[:, None].to(tl.int64) * stride_am + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = (  # [BLOCK_K, BLOCK_N]: the expert's rows `cols`, transposed
        w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
        + ks[:, None]
    )  # fmt: skip
    up_offset = N * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:  # the interpreter cannot tl.dot half operands
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        if SILU_MUL:
            w_up = tl.load(w_ptrs + up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_F32:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _epilogue(acc, acc_up, weights_ptr, pair, valid, SILU_MUL, WEIGHTED)
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _pair_gemv_kernel(
    a_ptr,  # as _grouped_gemm_kernel's
    w_ptr,
    out_ptr,
    ids_ptr,  # [num_pairs] each pair's expert
    weights_ptr,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    A_PER_TOKEN: tl.constexpr,
    SILU_MUL: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair, col_block = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    row = pair // TOP_K if A_PER_TOKEN else pair
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row.to(tl.int64) * stride_am + ks
    # [BLOCK_N, BLOCK_K] tiles along K: each weight row is read contiguously, once
    w_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    up_offset = N * stride_wn
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w_mask = col_ok[:, None] & k_ok[None, :]
        acc += tl.sum(tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32) * a, axis=1)
        if SILU_MUL:
            w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0).to(tl.float32)
            acc_up += tl.sum(w_up * a, axis=1)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pair_1 = tl.zeros([1], tl.int32) + pair  # the epilogue works on rows
    acc = _epilogue(acc[None, :], acc_up[None, :], weights_ptr, pair_1, pair_1 >= 0, SILU_MUL,
                    WEIGHTED)  # fmt: skip
    out_ptrs = out_ptr + pair.to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])


def gemm_config(num_pairs: int, num_experts: int, is_cuda: bool) -> dict:
    """Block sizes of the grouped GEMMs: small row blocks when experts get few pairs each."""
    if not is_cuda:  # interpreter: small tiles so test shapes span several
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    block_m = 16 if num_pairs <= 2 * num_experts else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def align_pairs(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to a multiple of `block_m`.

    ids: `[num_pairs]` expert of each pair. Returns (pairs int32 `[padded]`, `num_pairs` in the
    padding; block_expert int32 `[padded / block_m]`, -1 for blocks past the last run), sized
    from `num_pairs` and `num_experts` alone (no device -> host read)."""
    num_pairs = ids.numel()
    ids = ids.long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(ids, stable=True)  # pair ids, grouped by expert in pair order
    expert_of = ids[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=ids.device) - first_of_expert[expert_of]
    # at most min(pairs, experts) runs are non-empty, each padded by < block_m
    size = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    size = triton.cdiv(size, block_m) * block_m
    pairs = torch.full((size,), num_pairs, dtype=torch.int32, device=ids.device)
    pairs[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    starts = torch.arange(0, size, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def _launch(a, w, out, weights, ids, aligned, top_k, silu_mul, weighted, cfg) -> None:
    """One projection over every pair: `out[pair] = epilogue(a[row(pair)] @ w[expert]^T)`."""
    n = out.shape[1]
    k = a.shape[1]
    common = dict(TOP_K=top_k, A_PER_TOKEN=not weighted, SILU_MUL=silu_mul, WEIGHTED=weighted)
    strides = (a.stride(0), w.stride(0), w.stride(1), out.stride(0))
    if aligned is None:  # per-pair GEMV
        block_n, block_k = (16, 256) if a.is_cuda else (16, 32)
        grid = (out.shape[0], triton.cdiv(n, block_n))
        extra = {"num_warps": 4} if a.is_cuda else {}
        _pair_gemv_kernel[grid](a, w, out, ids, weights, n, k, *strides, **common,
                                BLOCK_N=block_n, BLOCK_K=block_k, **extra)  # fmt: skip
        return
    pairs, block_expert = aligned
    grid = (block_expert.shape[0], triton.cdiv(n, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](a, w, out, pairs, block_expert, weights, out.shape[0], n, k,
                               *strides, **common, DOT_F32=not a.is_cuda, **cfg)  # fmt: skip


def fused_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gemv_max_tokens: int = GEMV_MAX_TOKENS,
) -> torch.Tensor:
    """`sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t])`, `e = ids[t, j]`.

    x `[T, H]`; gate_up `[E, 2 * I, H]`; down `[E, H, I]`; weights / ids `[T, top_k]`.
    Returns `[T, H]` in x's dtype."""
    num_tokens, top_k = ids.shape
    num_experts, inter = gate_up.shape[0], down.shape[2]
    assert gate_up.stride(-1) == 1 and down.stride(-1) == 1, "expert rows need a unit stride"
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    flat_ids = ids.reshape(-1).to(torch.int32)
    flat_weights = weights.reshape(-1).to(torch.float32).contiguous()
    hidden = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(num_pairs, down.shape[1], dtype=torch.float32, device=x.device)
    cfg = gemm_config(num_pairs, num_experts, x.is_cuda)
    aligned = None
    if num_tokens > gemv_max_tokens:
        aligned = align_pairs(flat_ids, num_experts, cfg["BLOCK_M"])
    _launch(x, gate_up, hidden, flat_weights, flat_ids, aligned, top_k, True, False, cfg)
    _launch(hidden, down, out, flat_weights, flat_ids, aligned, top_k, False, True, cfg)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)
