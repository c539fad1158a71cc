"""SiLU-and-multiply for packed gate/up projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import fused_ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] = [gate | up] -> silu(gate) * up: [..., d]."""
    if x.is_cuda and fused_ops() is not None:
        return fused_ops().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
