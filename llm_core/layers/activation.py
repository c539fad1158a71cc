"""Gated activations for packed gate/up projections (SiLU, GELU-tanh), and squared ReLU."""

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


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] = [gate | up] -> gelu_tanh(gate) * up: [..., d] (Gemma's MLP)."""
    if x.is_cuda and fused_ops() is not None:
        return fused_ops().silu_and_mul(x, gelu_tanh=True)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (Nemotron's MLP), rounded as HF's two ops round."""
    return torch.square(F.relu(x))
