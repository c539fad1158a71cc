"""CLIP vision tower (transformers' `CLIPVisionModel`): Conv2d patch embedding with a class
token and learned positions, a pre-LayerNorm, pre-norm ViT layers.

LLaVA-style models read the hidden states of one or more layers (`vision_feature_layer`, HF's
`hidden_states[i]`: 0 is the pre-LayerNorm's output, i the i-th layer's), so the tower runs
only as deep as the deepest layer asked for. Parameter names as HF's under the tower's root
(`embeddings.*`, `pre_layrnorm`, `encoder.layers.N.*`, `post_layernorm`, kept for loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vit import ViTEncoder, uniform_segments


class ClipEmbeddings(nn.Module):
    """`[N, C, S, S]` -> `[N, 1 + (S/p)^2, dim]`: class token, patches, plus positions."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = F.conv2d(pixel_values.to(weight.dtype), weight, stride=self.patch_size)
        patches = patches.flatten(2).transpose(1, 2)  # [N, patches, dim]
        if patches.shape[1] + 1 != self.num_positions:
            raise ValueError(
                f"CLIP takes {self.num_positions - 1} patches an image, got {patches.shape[1]}"
            )
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipVisionTower(nn.Module):
    """`[N, C, S, S]` pixel values -> the hidden states of `feature_layers`, concatenated on the
    feature axis: `[N, 1 + patches, dim * len(feature_layers)]`."""

    def __init__(self, cfg, backend) -> None:
        super().__init__()
        self.attn_backend = backend
        self.num_layers = cfg.num_hidden_layers
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, feature_layers: list[int]) -> torch.Tensor:
        count = pixel_values.shape[0]
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # [N, tokens, dim]
        tokens = x.shape[1]
        x = x.flatten(0, 1)
        meta = uniform_segments(count, tokens, x.device)
        # HF hidden_states index i (negative from the end of num_layers + 1 states)
        wanted = [i if i >= 0 else self.num_layers + 1 + i for i in feature_layers]
        states = {0: x}
        for index, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x, meta, self.attn_backend)
            states[index] = x
        picked = torch.cat([states[i] for i in wanted], dim=-1)
        return picked.view(count, tokens, -1)
