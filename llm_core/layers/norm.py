"""RMSNorm with an optional fused residual add (Triton on CUDA, torch elsewhere)."""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.layers import fused_ops


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual); like HF: normalize in fp32, cast, then scale."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


class RMSNorm(nn.Module):
    """`forward(x, residual=None) -> normed` or `(normed, x + residual)` when residual given."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and fused_ops() is not None:
            out, res = fused_ops().rms_norm(x, self.weight, self.eps, residual)
        else:
            out, res = rms_norm_torch(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)
