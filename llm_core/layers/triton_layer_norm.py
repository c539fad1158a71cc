"""Residual add + LayerNorm in one pass (Triton, CUDA): BERT's post-LN blocks normalize
`sublayer(x) + x`, which eagerly is an add kernel (2 reads, 1 write of `[tokens, hidden]`) and a
LayerNorm kernel (1 read, 1 write); fused, the two inputs are read once and the normed rows
written once (issue 16).

`add_layer_norm_ref` is the definition it matches: torch's `x + residual` (rounded to x's
dtype), then `F.layer_norm` (statistics and affine in fp32, one rounding at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _add_layer_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: h = x (+ residual); out = (h - mean) * rstd * w + b."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + r
    h = x.to(tl.float32)
    mean = tl.sum(h, 0) / hidden
    centered = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / hidden + eps)  # biased variance
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = centered * rstd * w + b
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm over the last dim of `x + residual` (of `x` without one), in x's dtype."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [rows, hidden]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = x2  # unused by the kernel without a residual
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _add_layer_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, bias, out, hidden, eps, x2.stride(0), r2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return out.view(x.shape)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Torch reference of `add_layer_norm` (BERT's `LayerNorm(sublayer(x) + x)`)."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
