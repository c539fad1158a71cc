"""Mllama's tiled vision encoder (transformers' `MllamaVisionModel` + the projector of
`MllamaModel`): Llama 3.2 Vision's image states, which the decoder's cross-attention layers read.

An image comes as `max_num_tiles` tiles of `image_size` pixels (the processor's canvas split,
padded with zero tiles), and its aspect ratio id selects learned per-tile embeddings:

    patches (Conv2d, no bias) -> + gated pre-tile embedding (by aspect ratio) -> class token
    -> + gated position embedding ((1 - tanh g) * positions + tanh g * tile positions)
    -> LayerNorm -> pad each tile's patches to a multiple of 8
    -> local transformer over all tiles at once (ungated layers; some layers' outputs kept)
    -> LayerNorm -> + gated post-tile embedding -> global transformer (tanh-gated layers)
    -> drop the padding -> [final | kept layers] per patch -> projector to the text width

Attention inside the image is masked only between two padding positions (a padding tile or a
tile's padding patches), as transformers' `_prepare_aspect_ratio_attention_mask` builds it.
`encode` gives each image `max_num_tiles * (patches + 1)` rows in tile order, the padding tiles'
rows included (the decoder's text before an image attends to them, as in transformers).

Names follow transformers' under the encoder root: `vision_model.*`, `multi_modal_projector.*`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vision_layers import get_activation, load_checked, make_uninitialized


class GatedAspectRatioEmbedding(nn.Module):
    """One learned `[max_tiles, dim]` offset per aspect ratio id, times tanh(gate)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        rows = len(cfg.supported_aspect_ratios) + 1  # id 0: padding
        self.embedding = nn.Embedding(rows, self.max_tiles * self.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [N, tiles, patches, dim]; ids: [N]
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.dim)
        return x + emb * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """Patch positions (shared by tiles) and per-aspect-ratio tile positions, mixed by a gate."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.empty(self.num_patches, self.dim))
        rows = len(cfg.supported_aspect_ratios) + 1
        self.tile_embedding = nn.Embedding(rows, self.max_tiles * self.num_patches * self.dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [N, tiles, patches + 1, dim]
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.num_patches, self.dim)
        tiles = self.tile_embedding(aspect_ratio_ids)
        tiles = tiles.view(-1, self.max_tiles, self.num_patches, self.dim)
        return x + gate * tiles


class MllamaVisionAttention(nn.Module):
    """Multi-head attention without biases, masked by `allowed` (bool `[N, 1, L, L]`)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.attention_heads
        self.head_dim = cfg.hidden_size // cfg.attention_heads
        dim = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.o_proj = nn.Linear(dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        # [N, L, dim] -> [N, heads, L, head_dim]
        q, k, v = (
            p(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))


class MllamaVisionLayer(nn.Module):
    """Pre-LayerNorm block; a global layer scales both branches by tanh of a learned gate."""

    def __init__(self, cfg, gated: bool) -> None:
        super().__init__()
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = _Mlp(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), allowed)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class _Mlp(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layers(nn.Module):
    """A stack of vision layers (HF's `MllamaVisionEncoder`: `layers.N`)."""

    def __init__(self, cfg, count: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionLayer(cfg, gated) for _ in range(count))


class MllamaVisionTower(nn.Module):
    """`[N, tiles, C, S, S]` pixels + aspect ratio ids / tile counts -> `[N, tiles, patches + 1,
    vision_output_dim]` (the final states and the kept local layers', concatenated)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.kept = list(cfg.intermediate_layers_indices)
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, self.dim, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.empty(self.dim))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = GatedAspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = GatedAspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(self.dim)
        self.layernorm_post = nn.LayerNorm(self.dim)
        self.transformer = _Layers(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = _Layers(cfg, cfg.num_global_layers, gated=True)

    def forward(
        self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, num_tiles: torch.Tensor
    ) -> torch.Tensor:
        n, tiles = pixels.shape[:2]
        weight = self.patch_embedding.weight
        x = F.conv2d(pixels.flatten(0, 1).to(weight.dtype), weight, stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2).reshape(n, tiles, -1, self.dim)  # [N, T, patches, D]
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.expand(n, tiles, 1, self.dim)
        x = self.gated_positional_embedding(torch.cat([cls, x], dim=2), aspect_ratio_ids)
        x = self.layernorm_pre(x)
        pad = (8 - self.num_patches % 8) % 8
        x = F.pad(x, (0, 0, 0, pad))  # [N, T, P + pad, D]
        length = self.num_patches + pad
        allowed = _allowed(num_tiles, tiles, self.num_patches, length)  # [N, 1, T*L, T*L]
        x = x.view(n, tiles * length, self.dim)
        kept = {}  # layer index -> its output
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, allowed)
            if i in self.kept:
                kept[i] = x
        x = self.layernorm_post(x).view(n, tiles, length, self.dim)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids)
        x = x.view(n, tiles * length, self.dim)
        for layer in self.global_transformer.layers:
            x = layer(x, allowed)
        # [N, T*L, D * (1 + kept)]: the final states, then the kept layers' features
        # interleaved (HF stacks them on a last axis and flattens)
        stacked = torch.stack([kept[i] for i in self.kept], dim=-1).flatten(-2)
        x = torch.cat([x, stacked], dim=-1)
        return x.view(n, tiles, length, -1)[:, :, : self.num_patches]


def _allowed(num_tiles: torch.Tensor, tiles: int, patches: int, length: int) -> torch.Tensor:
    """bool `[N, 1, T*L, T*L]`: every pair but two padding positions (a tile past the image's
    count, or a patch past `patches`) may attend (transformers' aspect-ratio mask)."""
    device = num_tiles.device
    real_tile = torch.arange(tiles, device=device)[None, :] < num_tiles[:, None]  # [N, T]
    real_patch = torch.arange(length, device=device) < patches  # [L]
    padding = ~(real_tile[:, :, None] & real_patch[None, None, :]).flatten(1)  # [N, T*L]
    return ~(padding[:, :, None] & padding[:, None, :])[:, None]


class MllamaVisionEncoder(nn.Module):
    """The vision tower and the projector: `encode(items)` gives each image's rows
    `[max_tiles * (patches + 1), text_hidden]` (tiles in order, padding tiles included)."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        vision = hf_config.vision_config
        self.vision_model = MllamaVisionTower(vision)
        text_hidden = hf_config.get_text_config().hidden_size
        self.multi_modal_projector = nn.Linear(vision.vision_output_dim, text_hidden, bias=True)

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `MllamaConfig` (parameters uninitialized)."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call for all images (their `pixel_values` `[max_tiles, C, S, S]` staged,
        `aspect_ratio_id` and `num_tiles` from the processor)."""
        pixels = torch.stack([item.data["pixel_values"] for item in items])
        device = pixels.device
        ids = torch.tensor([int(item.data["aspect_ratio_id"]) for item in items], device=device)
        tiles = torch.tensor([int(item.data["num_tiles"]) for item in items], device=device)
        states = self.multi_modal_projector(self.vision_model(pixels, ids, tiles))
        return list(states.flatten(1, 2).unbind(0))  # [T * (patches + 1), text_hidden] each
