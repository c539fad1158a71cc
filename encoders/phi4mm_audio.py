"""Phi-4-multimodal's speech encoder: the conformer of transformers' `Phi4MultimodalAudioModel`
(the hub's `ConformerEncoder`), one clip at a time.

log-mel `[T, 80]` -> global mean / inverse-std -> NeMo conv subsampling (x `time_reduction`,
stride-2 convs) -> `num_blocks` conformer layers (half FFN, self-attention with a T5-style
relative position bias, conv module, half FFN, LayerNorm) -> `[ceil(T / 8), 1024]`. Clips longer
than 500 subsampled frames run as 500-frame chunks (the last zero-padded), as the reference.

The reference adds its attention mask to the bias as a number (`bool + float`: allowed keys get
+1, others +0), so with a streaming `chunk_size` the "mask" only tilts the scores; we do the
same. Parameter names are transformers' (the model's loader renames the hub's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_FRAMES = 500  # the reference's chunk length after subsampling


class MeanVarianceNorm(nn.Module):
    """`(x - global_mean) * global_invstd` (parameters: the checkpoint stores them)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.global_mean = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.global_invstd = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.global_mean) * self.global_invstd


class NemoConvSubsampling(nn.Module):
    """`[B, T, F]` -> `[B, ceil(T / r), hidden]`: log2(r) stride-2 convs (depthwise-separable
    after the first), ReLU, flatten channels x frequency, one linear."""

    def __init__(self, cfg) -> None:
        super().__init__()
        channels = cfg.nemo_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(int(math.log2(cfg.time_reduction)) - 1):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                       nn.Conv2d(channels, channels, 1), nn.ReLU()]  # fmt: skip
        self.conv = nn.Sequential(*layers)
        freq = cfg.input_size
        for _ in range(int(math.log2(cfg.time_reduction))):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(channels * freq, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # [B, C, T', F']
        b, _, t, _ = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, -1))


class RelativeAttentionBias(nn.Module):
    """T5-style bias per head from the clipped key - query offset: `[1, heads, T, T]`."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_distance, self.symmetric = cfg.bias_max_distance, cfg.bias_symmetric
        buckets = self.max_distance * (1 if self.symmetric else 2)
        self.bias_values = nn.Embedding(buckets, cfg.num_attention_heads)

    def forward(self, length: int, device) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance - 1)
        idx = rel.abs() if self.symmetric else rel + self.bias_values.num_embeddings // 2
        return self.bias_values(idx).permute(2, 0, 1).unsqueeze(0)


class FeedForward(nn.Module):
    """LayerNorm -> gate_up -> up * swish(gate) (up first, as the reference) -> down."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class SelfAttention(nn.Module):
    """Multi-head attention with an additive `[1 | B, heads, T, T]` bias (biased q/k/v/o)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, dim = x.shape
        # [B, T, dim] -> [B, heads, T, head_dim]
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, dim))


class GluPointWiseConv(nn.Module):
    """1x1 conv to 2 x channels, then `(a + b1) * swish(g + b2)`."""

    def __init__(self, cfg) -> None:
        super().__init__()
        out = self.out = cfg.ext_pw_out_channel
        self.ext_pw_conv_1d = nn.Conv1d(cfg.hidden_size, 2 * out, 1)
        self.b1 = nn.Parameter(torch.zeros(1, out, 1))
        self.b2 = nn.Parameter(torch.zeros(1, out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ext_pw_conv_1d(x.transpose(1, 2))  # [B, 2 * out, T]
        out = (h[:, : self.out] + self.b1) * F.silu(h[:, self.out :] + self.b2)
        return out.transpose(1, 2)


class DepthWiseSeparableConv1d(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        dim, mult = cfg.hidden_size, cfg.depthwise_multiplier
        self.dw_conv = nn.Conv1d(dim, dim * mult, cfg.kernel_size, padding=cfg.kernel_size - 1,
                                 groups=dim)  # fmt: skip
        self.pw_conv = nn.Conv1d(dim * mult, cfg.depthwise_separable_out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.dw_conv(x))


class ConvModule(nn.Module):
    """LayerNorm -> GLU -> causal depthwise-separable conv -> swish -> 1x1 conv."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.kernel_size = cfg.kernel_size
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.glu = GluPointWiseConv(cfg)
        self.dw_sep_conv_1d = DepthWiseSeparableConv1d(cfg)
        self.ext_pw_conv_1d = nn.Conv1d(cfg.hidden_size, cfg.ext_pw_out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw_sep_conv_1d(self.glu(self.layer_norm(x)).transpose(1, 2))  # [B, C, T + k-1]
        if self.kernel_size > 1:
            h = h[:, :, : -(self.kernel_size - 1)]  # keep it causal
        return self.ext_pw_conv_1d(F.silu(h)).transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.feed_forward_in = FeedForward(cfg)
        self.self_attn = SelfAttention(cfg)
        self.conv = ConvModule(cfg)
        self.feed_forward_out = FeedForward(cfg)
        self.layer_norm_att = nn.LayerNorm(cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        residual = x + 0.5 * self.feed_forward_in(x)
        x = residual + self.self_attn(self.layer_norm_att(residual), bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


def streaming_mask(length: int, chunk_size: int, left_chunk: int) -> torch.Tensor:
    """bool `[T, T]`: a frame sees its chunk and `left_chunk` chunks before it (all frames when
    `chunk_size` <= 0), the reference's `adaptive_enc_mask` at inference."""
    if chunk_size <= 0:
        return torch.ones(length, length, dtype=torch.bool)
    chunk = torch.arange(length) // chunk_size  # each frame's chunk index
    first = (chunk - left_chunk).clamp(min=0) * chunk_size  # first visible frame
    last = (chunk + 1) * chunk_size  # one past the last visible frame
    cols = torch.arange(length)[None, :]
    return (cols >= first[:, None]) & (cols < last[:, None])


class ConformerEncoder(nn.Module):
    """HF `Phi4MultimodalAudioModel`: `[T, input_size]` features -> `[ceil(T / r), hidden]`."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_embedding = MeanVarianceNorm(cfg.input_size)
        self.embed = NemoConvSubsampling(cfg)
        self.relative_attention_bias_layer = RelativeAttentionBias(cfg)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.encoder_embedding(features).unsqueeze(0))  # [1, T', hidden]
        length = x.shape[1]
        pad = 0
        if length > MAX_FRAMES:  # chunks of 500 frames, the last zero-padded, run as a batch
            pad = (MAX_FRAMES - length % MAX_FRAMES) % MAX_FRAMES
            x = F.pad(x, (0, 0, 0, pad)).view(-1, MAX_FRAMES, x.shape[-1])
        steps = x.shape[1]
        mask = streaming_mask(steps, self.cfg.chunk_size, self.cfg.left_chunk).to(x.device)
        # the reference's `bool + float`: +1 where the mask allows (see the module docstring)
        bias = self.relative_attention_bias_layer(steps, x.device) + mask.to(x.dtype)
        for layer in self.encoders:
            x = layer(x, bias)
        x = x.reshape(-1, x.shape[-1])  # [chunks * steps, hidden]
        return x[: x.shape[0] - pad]
