"""Whisper's audio encoder (transformers' `WhisperEncoder`): one 30 s window of log-mel features
`[num_mel_bins, 2 * max_source_positions]` -> `[max_source_positions, d_model]` states, which
the decoder's cross-attention layers read (their K/V written once per request).

    conv1 (k3, pad 1) -> GELU -> conv2 (k3, stride 2, pad 1) -> GELU -> + sinusoidal positions
    -> pre-LayerNorm layers (attention over the whole window, fc1 -> GELU -> fc2) -> LayerNorm

Queries are scaled before the product, as transformers does (its order of rounding). Names
follow transformers' under the encoder root (`conv1`, `embed_positions`, `layers.N.*`,
`layer_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vision_layers import get_activation, load_checked, make_uninitialized
from polymodal.encoders.vit import uniform_segments
from polymodal.llm_core.attention import TorchAttentionBackend


class WhisperEncoderAttention(nn.Module):
    """Multi-head attention within each window; k_proj has no bias (HF's names)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segments, backend) -> torch.Tensor:
        n = x.shape[0]
        # [frames, dim] -> [frames, heads, head_dim]; q scaled first, as transformers
        q = (self.q_proj(x) * self.head_dim**-0.5).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        out = backend.varlen_attention(q, k, v, segments.cu_seqlens, segments.max_seqlen, 1.0)
        return self.out_proj(out.reshape(n, -1))


class WhisperEncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, cfg) -> None:
        super().__init__()
        dim = cfg.d_model
        self.self_attn = WhisperEncoderAttention(dim, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.act = get_activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, segments, backend) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), segments, backend)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperAudioEncoder(nn.Module):
    """`encode(items)`: each item's `input_features` `[num_mel_bins, frames]` (one 30 s window,
    frames = 2 * max_source_positions) -> `[max_source_positions, d_model]`."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        self.backend = backend if backend is not None else TorchAttentionBackend()
        dim = hf_config.d_model
        self.num_frames = hf_config.max_source_positions
        self.conv1 = nn.Conv1d(hf_config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(self.num_frames, dim)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(hf_config) for _ in range(hf_config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `WhisperConfig` (parameters uninitialized)."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[N, mels, 2 * frames]` -> `[N * frames, d_model]` (windows one after another)."""
        weight = self.conv1.weight
        x = F.gelu(self.conv1(features.to(weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [N, frames, d_model]
        if x.shape[1] != self.num_frames:
            raise ValueError(
                f"Whisper takes {2 * self.num_frames} feature frames (30 s), got "
                f"{features.shape[-1]}"
            )
        x = (x + self.embed_positions.weight).flatten(0, 1)
        segments = uniform_segments(features.shape[0], self.num_frames, x.device)
        for layer in self.layers:
            x = layer(x, segments, self.backend)
        return self.layer_norm(x)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One call for every window (`input_features` on the encoder's device)."""
        weight = self.conv1.weight
        features = torch.stack(
            [item.data["input_features"].to(weight.device, weight.dtype) for item in items]
        )
        return list(self.forward(features).split(self.num_frames))
