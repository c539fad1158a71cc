"""Triton GEMV for a few rows: `F.linear(x, weight, bias)` with `x [M <= 8, K]`.

Decode at small batch reads every weight once per step and does almost no math, so the
kernel is shaped for memory bandwidth, not tensor cores: a program owns `BLOCK_N` output
features, streams their weight rows along K in `[BLOCK_N, BLOCK_K]` tiles (coalesced, 16-byte
vector loads), and multiplies each tile by every x row (broadcast-multiply + `tl.sum`; `tl.dot`
would pad M to 16). Shapes with few output blocks (o_proj, qkv, down) also split K across
programs: fp32 partials go to a `[SPLIT_K, M, N]` workspace and the last split of each feature
block to finish (an atomic arrival counter) sums them, so a call is one kernel. `silu_mul=True`
reads a packed `[gate | up]` input and applies SiLU-and-multiply as it loads x (the MLP's down
projection needs no activation kernel then). The residual add and the RMSNorm between
blocks fold in too: a GEMV given `residual` adds it to its output and writes each feature
block's sum of squares; the next GEMV, given that as a `DeferredNorm`, sums those (in a fixed
order) to each row's 1/rms and normalizes x as it loads it (batch-1 decode runs no norm
kernel between layers). Gemma's sandwich boundary folds the same way: given `post_norm` the
GEMV's last feature block to finish normalizes the whole output rows, adds them to the
residual and writes h's sums of squares (`gemv_folds.post_norm_tail`), and the next GEMV
applies the unit-offset `(1 + w)` norm as it loads x. A LoRA layer's low-rank term
(`LoRADelta`, gemv_lora.py) is added in the epilogue too, after the rounding to the output
dtype and before the residual: the same order as the unfused path (product, `+= delta`, then
the add), so LoRA keeps every fold.

Everything the launch depends on is a host int derived from shapes, so calls can be captured
in CUDA graphs (no syncs, no autotuning at first call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv_config import (  # noqa: F401  (GemvConfig .. : this API too)
    TILE_ELEMENTS,
    GemvConfig,
    default_config,
    num_sms,
)
from polymodal.llm_core.layers.gemv_folds import norm_args, post_norm_tail, row_rstd
from polymodal.llm_core.layers.gemv_lora import LoRADelta, lora_delta, lora_rows
from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

MAX_ROWS = 8  # x rows the kernel takes (padded to a power of two inside)
# L2 eviction hint of the weight loads (read once a step: let them go first, keep what is re-read;
# H200 7B decode: 3.762 with the default policy -> 3.735 ms a token)
WEIGHT_EVICTION = "evict_first"


@triton.jit
def x_row(x_ptr, m, M, K, stride_xm, k, rstd, wn, offs_m, SILU_MUL: tl.constexpr,
          NORM: tl.constexpr, UNIT: tl.constexpr, GELU_TANH: tl.constexpr):  # fmt: skip
    """x[m, k] (x's dtype; 0 past K and for padded rows m >= M), folds applied as they load.

    SILU_MUL: x rows are `[gate | up]` (2K wide) and x[m, k] = silu(gate) * up, rounded to the
    input dtype exactly as `triton_ops.silu_and_mul` rounds it (GELU_TANH: gelu_tanh(gate) * up,
    as its `gelu_tanh=True`). NORM: x[m, k] is RMS-normalized with row m's `rstd` (of `[BLOCK_M]`)
    and the norm weight tile `wn` (fp32), rounded as `rms_norm` rounds (UNIT: Gemma's,
    `(x * rstd) * (1 + wn)` rounded once)."""
    mask = (k < K) & (m < M)
    x = tl.load(x_ptr + m * stride_xm + k, mask=mask, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + m * stride_xm + K + k, mask=mask, other=0.0).to(tl.float32)
        if GELU_TANH:  # as `silu_and_mul(gelu_tanh=True)`: 2 sqrt(2/pi) (g + 0.044715 g^3)
            inner = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
            x = (gate * tl.sigmoid(inner) * up).to(x.dtype)
        else:
            x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    if NORM:
        rstd_m = tl.sum(tl.where(offs_m == m, rstd, 0.0), 0)
        if UNIT:
            x = ((x.to(tl.float32) * rstd_m) * (1.0 + wn)).to(x.dtype)
        else:
            x = (wn * (x.to(tl.float32) * rstd_m).to(x.dtype).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def gemv_tile(
    acc, w, x_ptr, M, K, stride_xm, k, offs_m, rstd, wn,
    BLOCK_M: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr,
    UNIT: tl.constexpr = False, GELU_TANH: tl.constexpr = False,
):  # fmt: skip
    """acc[f, m] += sum over the tile's k of w[f, k] * x[m, k] (padded rows m >= M read 0),
    x's rows as `x_row` loads them (folds applied)."""
    w = w.to(tl.float32)  # [BLOCK_N, BLOCK_K]
    for m in tl.static_range(BLOCK_M):
        x = x_row(x_ptr, m, M, K, stride_xm, k, rstd, wn, offs_m, SILU_MUL, NORM, UNIT,
                  GELU_TANH)  # fmt: skip
        part = tl.sum(w * x.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
        acc += tl.where(offs_m[None, :] == m, part[:, None], 0.0)
    return acc


@triton.jit
def fma_tile(acc2, w, x_ptr, M, K, k, offs_m, rstd, wn, SILU_MUL: tl.constexpr,
             NORM: tl.constexpr, UNIT: tl.constexpr, GELU_TANH: tl.constexpr):  # fmt: skip
    """One row: acc2[f, k] += w[f, k] * x[0, k], a `[BLOCK_N, BLOCK_K]` fp32 accumulator summed
    over k once, after the K loop (one FFMA a weight where `gemv_tile` multiplies, then sums
    each tile across threads: what an FP8 weight's extra convert leaves room for)."""
    x = x_row(x_ptr, 0, M, K, 0, k, rstd, wn, offs_m, SILU_MUL, NORM, UNIT, GELU_TANH)
    return acc2 + w.to(tl.float32) * x.to(tl.float32)[None, :]


@triton.jit
def _k_step(acc, acc2, w, x_ptr, M, K, stride_xm, k, offs_m, rstd, wn, BLOCK_M: tl.constexpr,
            SILU_MUL: tl.constexpr, NORM: tl.constexpr, UNIT: tl.constexpr,
            GELU_TANH: tl.constexpr, FMA2D: tl.constexpr):  # fmt: skip
    """One K tile of `_gemv_kernel` into `acc2` (FMA2D: `fma_tile`) or `acc` (`gemv_tile`)."""
    if FMA2D:
        acc2 = fma_tile(acc2, w, x_ptr, M, K, k, offs_m, rstd, wn, SILU_MUL, NORM, UNIT, GELU_TANH)
    else:
        acc = gemv_tile(acc, w, x_ptr, M, K, stride_xm, k, offs_m, rstd, wn, BLOCK_M, SILU_MUL,
                        NORM, UNIT, GELU_TANH)  # fmt: skip
    return acc, acc2


@triton.jit
def store_out(acc, out_ptr, r, sumsq_ptr, out_offs, out_mask, offs_m, M, pid_n, n_blocks,
              delta, RESIDUAL: tl.constexpr, LORA: tl.constexpr, SUMSQ: tl.constexpr):  # fmt: skip
    """out = acc in out's dtype; LORA: out = that + delta (rounded as `out += delta` rounds);
    RESIDUAL: out = that + r (the residual rows of this block, rounded like torch's add). SUMSQ:
    this feature block's sums of out^2 per row go to `sumsq[m, pid_n]`."""
    y = acc.to(out_ptr.dtype.element_ty)
    if LORA:
        y = (y.to(tl.float32) + delta).to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    if SUMSQ:
        h = tl.where(out_mask, y.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + offs_m * n_blocks + pid_n, tl.sum(h * h, 0), mask=offs_m < M)
    tl.store(out_ptr + out_offs, y, mask=out_mask)


@triton.jit(do_not_specialize=["M", "tiles_per_split"])  # fewer variants to compile
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    w_scale_ptr,  # fp32 [N]: an FP8 weight's per-channel scale (W_SCALE)
    out_ptr,
    part_ptr,  # fp32 [SPLIT_K, M, N] partial sums (SPLIT_K > 1)
    counter_ptr,  # int32 per feature block, zero between calls (SPLIT_K > 1)
    res_ptr,  # [M, N] residual stream (RESIDUAL)
    sumsq_ptr,  # fp32 [M, n_blocks] out: sums of squares per feature block (RESIDUAL)
    norm_w_ptr,  # [K] RMSNorm weight (NORM)
    norm_sumsq_ptr,  # fp32 [M, norm_parts]: x's sums of squares, from its producer (NORM)
    norm_parts,
    eps,
    lora_y_ptr,  # fp32 [M, LORA_SLICES * R] (LORA)
    lora_b_ptr,  # [L, N, R] (LORA)
    lora_slot_ptr,  # int32 [>= M]: each row's adapter slot, -1: none (LORA)
    lora_slice_ptr,  # int32 [LORA_SLICES]: each slice's first feature (LORA)
    R,
    post_w_ptr,  # [N] Gemma post-norm weight (POST_NORM)
    post_eps,
    h_ptr,  # [M, N] out: residual + post-norm(out) (POST_NORM)
    hsq_ptr,  # fp32 [M, 1] out: h's sums of squares (POST_NORM)
    done_ptr,  # int32, zero between calls: feature blocks finished (POST_NORM)
    M,
    N,
    K,
    stride_xm,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    GELU_TANH: tl.constexpr,  # SILU_MUL's activation is GELU-tanh (Gemma)
    RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    UNIT: tl.constexpr,  # the deferred norm is Gemma's (1 + w)
    BLOCK_P: tl.constexpr,  # norm_parts padded to a power of 2
    POST_NORM: tl.constexpr,  # Gemma's post-norm and the residual add in the epilogue
    BLOCK_Q: tl.constexpr,  # feature blocks padded to a power of 2 (POST_NORM)
    LORA: tl.constexpr,
    LORA_SLICES: tl.constexpr,
    BLOCK_R: tl.constexpr,  # R padded to a power of 2 (LORA)
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
    W_SCALE: tl.constexpr = False,  # FP8 weights times their scale, x as is (W8A16)
    FMA2D: tl.constexpr = False,  # one row, `fma_tile`'s 2-D accumulator
):
    """Program (n block, k split): acc[f, m] = sum over its K tiles of w[f, k] * x[m, k].

    Writes `out [M, N]` (+ bias, cast). With SPLIT_K > 1 each split stores its fp32 partial
    sums and the last split of a feature block to arrive (an atomic counter) adds all of them
    in split order, so the sum is deterministic and no second kernel runs; that program resets
    the counter for the next call. The first weight tile is loaded before the PDL wait: it
    streams in while the previous kernel finishes. W_SCALE: w is E4M3, each feature's sum
    times its scale (x stays 16-bit); one row then accumulates in 2-D (`fma_tile`).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: features x rows
    acc2 = tl.zeros((1, 1), dtype=tl.float32)  # FMA2D: `fma_tile`'s accumulator
    if FMA2D:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    k = tile_start * BLOCK_K + offs_k
    first = n_mask[:, None] & ((k < K) & (tile_start < tile_end))[None, :]
    w = tl.load(w_rows + k[None, :], mask=first, other=0.0, eviction_policy=WEIGHT_EVICTION)
    wn = tl.zeros((BLOCK_K,), dtype=tl.float32)  # the norm weight's tile (NORM)
    out_offs = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] -> out[m, f]
    out_mask = (offs_m[None, :] < M) & n_mask[:, None]
    r = acc  # the residual rows (RESIDUAL): written long before this kernel, so before the wait
    if RESIDUAL:
        r = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0)
    if NORM:
        wn = tl.load(norm_w_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    slots, lora_b, piece = offs_m, acc, offs_n  # unread without LORA
    if LORA:  # the rows' slots (copied in before the step's first kernel) and B (weights)
        slots, lora_b, piece = lora_rows(lora_slot_ptr, lora_b_ptr, lora_slice_ptr, offs_m,
                                         offs_n, n_mask, M, N, R, LORA_SLICES, BLOCK_N,
                                         BLOCK_R)  # fmt: skip
    pdl.wait(USE_PDL)
    rstd = row_rstd(norm_sumsq_ptr, norm_parts, eps, offs_m, M, K, NORM, BLOCK_P)
    delta = acc  # LORA: the rows' low-rank terms, loaded now: they stream in with x
    if LORA:
        delta = lora_delta(lora_y_ptr, lora_b, slots, piece, offs_m, R, LORA_SLICES, BLOCK_N,
                           BLOCK_M, BLOCK_R)  # fmt: skip
    if tile_start < tile_end:
        acc, acc2 = _k_step(acc, acc2, w, x_ptr, M, K, stride_xm, k, offs_m, rstd, wn, BLOCK_M,
                            SILU_MUL, NORM, UNIT, GELU_TANH, FMA2D)  # fmt: skip
    for tile in range(tile_start + 1, tile_end):
        k = tile * BLOCK_K + offs_k
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0,
                    eviction_policy=WEIGHT_EVICTION)  # fmt: skip
        if NORM:
            wn = tl.load(norm_w_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc, acc2 = _k_step(acc, acc2, w, x_ptr, M, K, stride_xm, k, offs_m, rstd, wn, BLOCK_M,
                            SILU_MUL, NORM, UNIT, GELU_TANH, FMA2D)  # fmt: skip
    if FMA2D:
        acc = tl.sum(acc2, 1)[:, None]
    if W_SCALE:  # per channel: on each split's partial sum (the sum is linear in it)
        acc *= tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split: sum all (fixed order), reset the counter
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                part = part_ptr + s * M * N + out_offs
                acc += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            store_out(acc, out_ptr, r, sumsq_ptr, out_offs, out_mask, offs_m, M, pid_n,
                      tl.num_programs(0), delta, RESIDUAL, LORA, RESIDUAL or POST_NORM)  # fmt: skip
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
            if POST_NORM:
                post_norm_tail(out_ptr, res_ptr, post_w_ptr, h_ptr, sumsq_ptr, hsq_ptr, done_ptr,
                               post_eps, M, N, BLOCK_Q, 1024)  # fmt: skip
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        store_out(acc, out_ptr, r, sumsq_ptr, out_offs, out_mask, offs_m, M, pid_n,
                  tl.num_programs(0), delta, RESIDUAL, LORA, RESIDUAL or POST_NORM)  # fmt: skip
        if POST_NORM:
            post_norm_tail(out_ptr, res_ptr, post_w_ptr, h_ptr, sumsq_ptr, hsq_ptr, done_ptr,
                           post_eps, M, N, BLOCK_Q, 1024)  # fmt: skip


def split_workspace(split_k: int, m: int, n: int, n_blocks: int, out: torch.Tensor):
    """(fp32 partials `[split_k, m, n]`, arrival counters per feature block) of a split-K GEMV
    launch; unsplit, `out` stands in for both (unread)."""
    if split_k == 1:
        return out, out
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=out.device)
    return part, arrival_counters(out.device, n_blocks)


def gemv(
    x,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    lora: LoRADelta | None = None,
    post_norm: tuple[torch.Tensor, float] | None = None,
    gelu_tanh: bool = False,
    w_scale: torch.Tensor | None = None,
):
    """`F.linear(x, weight, bias)` for `x [M, K]` with `M <= MAX_ROWS`, `weight [N, K]`
    (nn.Linear layout, contiguous); fp32 accumulation, output `[M, N]` in `x.dtype`.

    `silu_mul=True`: x is `[M, 2K]` = `[gate | up]` and the product uses `silu(gate) * up`
    (rounded like `silu_and_mul`), so the MLP's activation needs no kernel of its own.
    `x` may be a `DeferredNorm`: its rows are RMS-normalized as they load (no norm kernel).
    `residual [M, N]`: returns `AddedResidual(out + residual, sums of squares)` for the next
    GEMV's deferred norm (no add kernel either). Under PDL it is read before waiting on the
    kernel launched just before, which must not be what wrote it (the decoder's residual stream
    was written a block earlier).
    `lora`: each row's low-rank term is added to the output before the residual (`LoRADelta`).
    `gelu_tanh=True` (with `silu_mul`): GELU-tanh instead of SiLU, as
    `silu_and_mul(gelu_tanh=True)` (Gemma's MLP).
    `post_norm = (weight, eps)` of a Gemma RMSNorm, with `residual`: returns
    `AddedResidual(residual + post_norm(out), its sums of squares [M, 1])`, the last feature
    block to finish normalizing the whole rows (`gemv_folds.post_norm_tail`).
    `w_scale [N]` (fp32): `weight` is E4M3 (`torch.float8_e4m3fn`) with one scale a feature
    (per channel, or a per-tensor one repeated): the product of x as it is (16-bit, not
    quantized: W8A16) and the weight times its scale, every fold as above.
    `config=None` picks `default_config` from the shape and the device's SM count.
    """
    norm = x if isinstance(x, DeferredNorm) else None
    x = norm.h if norm is not None else x
    m, width = x.shape
    k = width // 2 if silu_mul else width
    n = weight.shape[0]
    w_dtype = x.dtype if w_scale is None else torch.float8_e4m3fn
    if m > MAX_ROWS or weight.shape[1] != k or weight.dtype != w_dtype or width % (1 + silu_mul):
        raise ValueError(
            f"gemv takes x [M <= {MAX_ROWS}, K] ([M, 2K] with silu_mul) and weight [N, K] of x's "
            f"dtype (E4M3 with w_scale); got x {tuple(x.shape)} {x.dtype}, weight "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    if w_scale is not None and (w_scale.numel() != n or w_scale.dtype != torch.float32):
        raise ValueError(
            f"gemv w_scale must be fp32 with one scale a feature ({n}): "
            f"{tuple(w_scale.shape)} {w_scale.dtype}"
        )
    if not weight.is_contiguous():
        raise ValueError("gemv needs a contiguous weight [N, K]")
    if residual is not None and (residual.shape != (m, n) or not residual.is_contiguous()):
        raise ValueError(f"gemv residual must be contiguous [{m}, {n}]: {tuple(residual.shape)}")
    if norm is not None and silu_mul:
        raise ValueError("gemv: a deferred norm and silu_mul do not combine")
    if gelu_tanh and not silu_mul:
        raise ValueError("gemv: gelu_tanh is the activation of silu_mul")
    if post_norm is not None and (residual is None or post_norm[0].shape != (n,)):
        raise ValueError(f"gemv post_norm needs a residual and a weight [{n}]")
    if lora is not None and (lora.y.shape[0] != m or lora.lora_b.shape[1:2] != (n,)):
        raise ValueError(
            f"gemv lora terms {tuple(lora.y.shape)}, B {tuple(lora.lora_b.shape)} do not "
            f"fit x of {m} rows and {n} features"
        )
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = config or default_config(m, n, k, num_sms(x.device), silu_mul, w_scale is not None)
    n_blocks = triton.cdiv(n, cfg.block_n)
    sumsq = out  # unread without a residual
    if residual is not None:  # with a post-norm: out's sums of squares per feature block
        sumsq = torch.empty((m, n_blocks), dtype=torch.float32, device=x.device)
    # POST_NORM: out is the product; the residual stream h and its sums of squares come back
    h, hsq, done, post_w, post_eps = out, sumsq, out, out, 0.0  # unread without a post-norm
    if post_norm is not None:
        h = torch.empty_like(out)
        hsq = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        done = arrival_counters(x.device, n_blocks + 1)[n_blocks:]  # after the split counters
        post_w, post_eps = post_norm
    if m == 0 or n == 0:
        return out if residual is None else AddedResidual(h, hsq)
    tiles_per_split = max(1, triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k))
    part, counters = split_workspace(cfg.split_k, m, n, n_blocks, out)
    b = bias if bias is not None else weight  # unread when HAS_BIAS is False
    res = residual if residual is not None else out  # unread without RESIDUAL
    norm_w, norm_sumsq, eps, parts = norm_args(norm, out)
    # unread without a LoRA term
    l_y, l_b, l_slot, l_slice, rank, l_slices = out, out, out, out, 1, 1
    if lora is not None:
        l_y, l_b, l_slot, l_slice = lora.y, lora.lora_b, lora.token_slot, lora.slice_offsets
        rank, l_slices = lora.lora_b.shape[2], l_slice.shape[0]
    scale = out if w_scale is None else w_scale.reshape(n)  # unread without one
    flag = pdl.use_pdl(x)
    _gemv_kernel[(n_blocks, cfg.split_k)](
        x, weight, b, scale, out, part, counters, res, sumsq, norm_w, norm_sumsq, parts, eps,
        l_y, l_b, l_slot, l_slice, rank, post_w, post_eps, h, hsq, done,
        m, n, k, x.stride(0), tiles_per_split,
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, GELU_TANH=gelu_tanh,
        RESIDUAL=residual is not None and post_norm is None, NORM=norm is not None,
        UNIT=norm is not None and norm.unit_offset, BLOCK_P=triton.next_power_of_2(parts),
        POST_NORM=post_norm is not None, BLOCK_Q=triton.next_power_of_2(n_blocks),
        LORA=lora is not None,
        LORA_SLICES=l_slices, BLOCK_R=triton.next_power_of_2(rank),
        SPLIT_K=cfg.split_k, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, WEIGHT_EVICTION=WEIGHT_EVICTION, USE_PDL=flag,
        W_SCALE=w_scale is not None, FMA2D=w_scale is not None and m == 1 and cfg.fma2d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=flag,
    )  # fmt: skip
    return out if residual is None else AddedResidual(h, hsq)
