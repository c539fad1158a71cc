"""The pre-norm ViT layer CLIP and SigLIP share (transformers' `CLIPEncoderLayer` /
`SiglipEncoderLayer`, same parameter names): LayerNorm, multi-head attention with separate
biased q/k/v/out projections, LayerNorm, fc1 -> activation -> fc2.

Images of a batch are packed into one flat `[num_patches, dim]` tensor; attention runs per
image through the backend's `varlen_attention` (segments from `VisionAttentionMeta`).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.encoders.vision_layers import VisionAttentionMeta, get_activation
from polymodal.llm_core.host_copy import copy_to


def uniform_segments(count: int, length: int, device: torch.device) -> VisionAttentionMeta:
    """`count` segments of `length` patches each (equal-sized images or tiles); the offsets are
    made on `device` (no host->device copy: a CUDA graph can capture the tower)."""
    cu_seqlens = torch.arange(0, (count + 1) * length, length, dtype=torch.int32, device=device)
    return VisionAttentionMeta(cu_seqlens, length)


def segments(lengths: list[int], device: torch.device) -> VisionAttentionMeta:
    """One segment per entry of `lengths` (images of different sizes)."""
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
    return VisionAttentionMeta(copy_to(cu_seqlens, device), max(lengths))


class ViTAttention(nn.Module):
    """Bidirectional attention within each segment; HF names `q_proj`, `k_proj`, `v_proj`,
    `out_proj` (all biased)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, meta: VisionAttentionMeta, backend) -> torch.Tensor:
        n = x.shape[0]
        # [num_patches, dim] -> [num_patches, heads, head_dim] each
        q, k, v = (
            p(x).view(n, self.num_heads, self.head_dim)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = backend.varlen_attention(
            q, k, v, meta.cu_seqlens, meta.max_seqlen, self.head_dim**-0.5, causal=False
        )
        return self.out_proj(out.reshape(n, -1))


class ViTMLP(nn.Module):
    """fc1 -> activation -> fc2 (both biased)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTEncoderLayer(nn.Module):
    """x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, dim: int, num_heads: int, hidden: int, act: str, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = ViTAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ViTMLP(dim, hidden, act)

    def forward(self, x: torch.Tensor, meta: VisionAttentionMeta, backend) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), meta, backend)
        return x + self.mlp(self.layer_norm2(x))


class ViTEncoder(nn.Module):
    """`layers.N` of `ViTEncoderLayer` (HF: `encoder.layers.N`)."""

    def __init__(self, cfg, num_layers: int | None = None) -> None:
        super().__init__()
        count = cfg.num_hidden_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList(
            ViTEncoderLayer(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.intermediate_size,
                cfg.hidden_act,
                cfg.layer_norm_eps,
            )
            for _ in range(count)
        )

    def forward(self, x, meta: VisionAttentionMeta, backend, num_layers: int | None = None):
        """Run the first `num_layers` layers (all by default)."""
        for layer in self.layers[:num_layers]:
            x = layer(x, meta, backend)
        return x
