"""What the GEMVs (16-bit `gemv.py`, `fp8_gemv.py`, `int4_gemv.py`, the MoE router and experts)
fold into x as they load it: a deferred RMSNorm (each row's 1/rms from its producer's per-block
sums of squares, `row_rstd` / `one_row_rstd`, then the norm weight) or SiLU-and-multiply of a
`[gate | up]` row (`load_x_folded`), rounded as the unfused kernels round; and a deferred
norm's launch arguments (`norm_args`)."""

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
