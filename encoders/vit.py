"""The pre-norm ViT layer CLIP and SigLIP share (transformers' `CLIPEncoderLayer` /
`SiglipEncoderLayer`, same parameter names): LayerNorm, multi-head attention with separate
biased q/k/v/out projections, LayerNorm, fc1 -> activation -> fc2.

Images of a batch are packed into one flat `[num_patches, dim]` tensor; attention runs per
image through the backend's `varlen_attention` (segments from `VisionAttentionMeta`).

Fewer, larger kernels on CUDA, same math: q/k/v run as one GEMM (their weights are views of one
packed tensor once loaded), each residual add runs inside the LayerNorm after it
(`add_layer_norm`; `ViTEncoder` carries the last MLP output to the next layer's norm or the final
one), and GELU-tanh runs in fc1's GEMM epilogue (cuBLASLt, fp32 before the one rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vision_layers import VisionAttentionMeta, get_activation
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.layers.norm import add_layer_norm


def uniform_segments(count: int, length: int, device: torch.device) -> VisionAttentionMeta:
    """`count` segments of `length` patches each (equal-sized images or tiles); the offsets are
    made on `device` (no host->device copy: a CUDA graph can capture the tower)."""
    cu_seqlens = torch.arange(0, (count + 1) * length, length, dtype=torch.int32, device=device)
    return VisionAttentionMeta(cu_seqlens, length)


def segments(lengths: list[int], device: torch.device) -> VisionAttentionMeta:
    """One segment per entry of `lengths` (images of different sizes)."""
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
    return VisionAttentionMeta(copy_to(cu_seqlens, device), max(lengths))


class PackedQKV(nn.Module):
    """Biased `q_proj`, `k_proj`, `v_proj` of `dim` -> `dim` (HF names) run as one GEMM: once
    loaded, their weights and biases are views of one packed `[3 dim, dim]` weight and bias.
    Checkpoints still load by HF's three names (into the views), and a later load writes the
    packed memory itself: CUDA graphs captured on it see the new weights."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.qkv_packed: tuple[torch.Tensor, torch.Tensor] | None = None  # set by post_load

    def post_load(self) -> None:
        """Make q/k/v's weights and biases views of one packed weight and bias."""
        if self.packed_qkv() is not None:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight.data for p in projs])
        bias = torch.cat([p.bias.data for p in projs])
        for p, w, b in zip(projs, weight.chunk(3), bias.chunk(3)):
            p.weight.data, p.bias.data = w, b
        self.qkv_packed = (weight, bias)

    def packed_qkv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed (weight, bias) while q/k/v's parameters are still its views, else None
        (`.to()` or new parameters replaced them: the three projections run apart)."""
        if self.qkv_packed is None:
            return None
        weight, bias = self.qkv_packed
        projs = (self.q_proj, self.k_proj, self.v_proj)
        for p, w, b in zip(projs, weight.chunk(3), bias.chunk(3)):
            if p.weight.data_ptr() != w.data_ptr() or p.bias.data_ptr() != b.data_ptr():
                return None
        return self.qkv_packed

    def project_qkv(self, x: torch.Tensor):
        """`[n, dim]` -> q, k, v `[n, heads, head_dim]` each (views of one GEMM's output when
        packed)."""
        n = x.shape[0]
        packed = self.packed_qkv()
        if packed is not None:
            return F.linear(x, *packed).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        return tuple(p(x).view(n, self.num_heads, self.head_dim) for p in projs)


class ViTAttention(PackedQKV):
    """Bidirectional attention within each segment; HF names `q_proj`, `k_proj`, `v_proj`,
    `out_proj` (all biased)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, meta: VisionAttentionMeta, backend) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        out = backend.varlen_attention(
            q, k, v, meta.cu_seqlens, meta.max_seqlen, self.head_dim**-0.5, causal=False
        )
        return self.out_proj(out.reshape(x.shape[0], -1))


class ViTMLP(nn.Module):
    """fc1 -> activation -> fc2 (both biased)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = get_activation(act)
        self.gelu_tanh = act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_tanh and x.is_cuda and x.dim() == 2:
            # fc1 + bias + GELU-tanh in one cuBLASLt GEMM (its GELU epilogue is the tanh form
            # on CUDA; on the CPU `_addmm_activation` takes the erf form, so not there)
            h = torch._addmm_activation(self.fc1.bias, x, self.fc1.weight.t(), use_gelu=True)
        else:
            h = self.act(self.fc1(x))
        return self.fc2(h)


class ViTEncoderLayer(nn.Module):
    """x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x)). `forward` returns the sum;
    `run` leaves the MLP's add to the caller (the next LayerNorm takes it)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, act: str, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = ViTAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ViTMLP(dim, hidden, act)

    def forward(self, x: torch.Tensor, meta: VisionAttentionMeta, backend) -> torch.Tensor:
        x, mlp = self.run(x, None, meta, backend)
        return x + mlp

    def run(self, x, delta, meta: VisionAttentionMeta, backend):
        """The layer over the stream `x + delta` (`x` when `delta` is None): returns the stream
        before the MLP's add and the MLP's output."""
        x, h = add_layer_norm(self.layer_norm1, x, delta)
        x, h = add_layer_norm(self.layer_norm2, x, self.self_attn(h, meta, backend))
        return x, self.mlp(h)


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

    def forward(
        self,
        x,
        meta: VisionAttentionMeta,
        backend,
        num_layers: int | None = None,
        final_norm: nn.LayerNorm | None = None,
    ):
        """Run the first `num_layers` layers (all by default); `final_norm` (the tower's
        post-LayerNorm) is applied to the last output, its residual add inside it."""
        delta = None  # the last layer's MLP output, not yet added to x
        for layer in self.layers[:num_layers]:
            x, delta = layer.run(x, delta, meta, backend)
        if final_norm is not None:
            return add_layer_norm(final_norm, x, delta)[1]
        return x if delta is None else x + delta
