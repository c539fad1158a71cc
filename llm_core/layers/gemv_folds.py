"""What the GEMVs (16-bit `gemv.py`, `fp8_gemv.py`, `int4_gemv.py`, the MoE router and experts)
fold into x as they load it: a deferred RMSNorm (each row's 1/rms from its producer's per-block
sums of squares, `row_rstd` / `one_row_rstd`, then the norm weight) or SiLU-and-multiply of a
`[gate | up]` row (`load_x_folded`), rounded as the unfused kernels round; a deferred norm's
launch arguments (`norm_args`); and the 16-bit GEMV's epilogue fold of Gemma's post-norm and
residual add (`post_norm_tail`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core.layers.norm import DeferredNorm


@triton.jit
def row_rstd(norm_sumsq_ptr, norm_parts, eps, offs_m, M, K, NORM: tl.constexpr,
             BLOCK_P: tl.constexpr):  # fmt: skip
    """Each row's 1/rms (`[BLOCK_M]` fp32; zeros without NORM) from its producer's per-block
    sums of squares `[M, norm_parts]`, summed in a fixed order."""
    rstd = tl.zeros(offs_m.shape, dtype=tl.float32)
    if NORM:
        offs_p = tl.arange(0, BLOCK_P)
        parts = norm_sumsq_ptr + offs_m[:, None] * norm_parts + offs_p[None, :]
        mask = (offs_m[:, None] < M) & (offs_p[None, :] < norm_parts)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.load(parts, mask=mask, other=0.0), 1) / K + eps)
    return rstd


@triton.jit
def one_row_rstd(norm_sumsq_ptr, norm_parts, eps, m, M, K, NORM: tl.constexpr,
                 BLOCK_P: tl.constexpr):  # fmt: skip
    """Row m's 1/rms (a scalar; 0 without NORM) from its producer's per-block sums of squares,
    for the quantized GEMVs (int4_gemv.py, fp8_gemv.py)."""
    rstd = 0.0
    if NORM:
        offs_p = tl.arange(0, BLOCK_P)
        parts = tl.load(norm_sumsq_ptr + m * norm_parts + offs_p,
                        mask=(offs_p < norm_parts) & (m < M), other=0.0)  # fmt: skip
        rstd = 1.0 / tl.sqrt(tl.sum(parts, 0) / K + eps)
    return rstd


@triton.jit
def load_x_folded(row, idx, mask, K, norm_w_ptr, rstd, SILU_MUL: tl.constexpr,
                  NORM: tl.constexpr):  # fmt: skip
    """x's features `idx` of one row (x's dtype), folds applied: SILU_MUL, the row is
    `[gate | up]` and the feature silu(gate) * up, rounded as `silu_and_mul` rounds; NORM,
    RMS-normalized with the row's `rstd` and the norm weight, rounded as `rms_norm` rounds."""
    x = tl.load(row + idx, mask=mask, other=0.0)
    if SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(row + K + idx, mask=mask, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    if NORM:
        wn = tl.load(norm_w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        x = (wn * (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
    return x


def norm_args(norm: DeferredNorm | None, unread: torch.Tensor):
    """(norm weight, producer's sums of squares, eps, their blocks) of a deferred norm for a
    GEMV launch; without one, `unread` stands in."""
    if norm is None:
        return unread, unread, 0.0, 1
    return norm.weight, norm.sumsq, norm.eps, norm.sumsq.shape[1]


@triton.jit
def post_norm_tail(y_ptr, res_ptr, w_ptr, h_ptr, ysq_ptr, hsq_ptr, done_ptr, eps, M, N,
                   BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Gemma's post-norm and residual add folded into a GEMV's epilogue (`gemv(post_norm=)`):
    called by each feature block's finishing program after it stored its block of `y [M, N]`
    and the block's sums of y^2 (`ysq [M, blocks]`). The last block to arrive (a counter at
    `done_ptr`, reset after) does every row: `h = residual + (1 + w) y / rms(y)` rounded as
    `sandwich_norm` rounds, stored to `h [M, N]` with its sum of squares (`hsq [M, 1]`: the
    next GEMV's deferred norm)."""
    n_blocks = tl.num_programs(0)
    tl.debug_barrier()  # every thread's y and partial are written before the counter moves
    arrived = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == n_blocks - 1:
        offs_q = tl.arange(0, BLOCK_Q)
        offs_t = tl.arange(0, BLOCK_T)
        for m in range(0, M):
            parts = tl.load(ysq_ptr + m * n_blocks + offs_q, mask=offs_q < n_blocks, other=0.0,
                            cache_modifier=".cg")  # fmt: skip
            rstd = 1.0 / tl.sqrt(tl.sum(parts, 0) / N + eps)
            acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_T):
                cols = n0 + offs_t
                mask = cols < N
                y = tl.load(y_ptr + m * N + cols, mask=mask, other=0.0, cache_modifier=".cg")
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                r = tl.load(res_ptr + m * N + cols, mask=mask, other=0.0).to(tl.float32)
                post = ((y.to(tl.float32) * rstd) * (1.0 + w)).to(y.dtype)
                h = (post.to(tl.float32) + r).to(y.dtype)
                tl.store(h_ptr + m * N + cols, h, mask=mask)
                hf = tl.where(mask, h.to(tl.float32), 0.0)
                acc += hf * hf
            tl.store(hsq_ptr + m, tl.sum(acc, 0))
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
