"""SigLIP vision tower (transformers' `SiglipVisionModel`, no pooling head): Conv2d patch
embedding + learned position embedding, pre-norm ViT layers, final LayerNorm.

Parameter names as HF's under the tower's root: `embeddings.patch_embedding`,
`embeddings.position_embedding`, `encoder.layers.N.*`, `post_layernorm` (checkpoints nest
them under `vision_tower.vision_model.` or `vision_tower.`; the model's remap table says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vit import ViTEncoder, uniform_segments


class SiglipEmbeddings(nn.Module):
    """Patches of `[N, C, S, S]` images -> `[N * (S/p)^2, dim]` plus position embeddings."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        # [N, dim, S/p, S/p] -> [N, patches, dim]
        patches = F.conv2d(pixel_values.to(weight.dtype), weight, self.patch_embedding.bias,
                           stride=self.patch_size)  # fmt: skip
        patches = patches.flatten(2).transpose(1, 2)
        if patches.shape[1] != self.num_positions:
            raise ValueError(
                f"SigLIP takes {self.num_positions} patches an image, got {patches.shape[1]}"
            )
        # Row-major: the sum keeps the conv output's channel-major layout, which left the whole
        # residual stream column-major (every add strided and every LayerNorm copying its input:
        # ~4 ms of Gemma 3's 17 ms tower on an H200).
        return (patches + self.position_embedding.weight).flatten(0, 1).contiguous()


class SiglipVisionTower(nn.Module):
    """`[N, C, S, S]` pixel values -> last hidden states `[N, patches, dim]` (post-LayerNorm),
    or the hidden states of one layer (`feature_layer`, HF's `hidden_states[i]`: 0 is the
    embeddings, i the i-th layer's output, negative from the end; no post-LayerNorm), or of
    several, concatenated on the feature axis (a list, as LLaVA's `vision_feature_layer`)."""

    def __init__(self, cfg, backend) -> None:
        super().__init__()
        self.attn_backend = backend
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, feature_layer: int | list[int] | None = None
    ) -> torch.Tensor:
        count = pixel_values.shape[0]
        x = self.embeddings(pixel_values)  # [N * patches, dim]
        meta = uniform_segments(count, self.num_positions, x.device)
        if feature_layer is None:
            x = self.encoder(x, meta, self.attn_backend, final_norm=self.post_layernorm)
        elif isinstance(feature_layer, int):  # the tower runs only as deep as the layer asked
            depth = len(self.encoder.layers)
            x = self.encoder(x, meta, self.attn_backend, feature_layer % (depth + 1))
        else:
            depth = len(self.encoder.layers)
            wanted = [i % (depth + 1) for i in feature_layer]
            states = {0: x} if 0 in wanted else {}  # only the asked-for layers are kept
            for index, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
                x = layer(x, meta, self.attn_backend)
                if index in wanted:
                    states[index] = x
            x = torch.cat([states[i] for i in wanted], dim=-1)
        return x.view(count, self.num_positions, -1)
