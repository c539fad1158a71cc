"""Qwen2-VL vision tower: ViT with 2D rotary, LayerNorm, QuickGELU MLP, full attention per frame.

Module tree and parameter names equal transformers' `visual.*` (`Qwen2VisionTransformer...`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.encoders.vision_layers import (
    PatchEmbed,
    PatchMerger,
    VisionAttention,
    VisionAttentionMeta,
    config_value,
    full_attention_meta,
    fused_rotary_tables,
    get_activation,
    load_checked,
    make_uninitialized,
    patch_coordinates,
    rope_theta,
    rotary_cos_sin,
)
from polymodal.llm_core.attention import TorchAttentionBackend


@dataclass(frozen=True)
class Qwen2VisionConfig:
    """The fields of HF `Qwen2VLVisionConfig` the tower needs."""

    depth: int
    embed_dim: int  # width of the ViT blocks
    out_hidden_size: int  # merger output = the decoder's hidden size (HF: `hidden_size`)
    num_heads: int
    mlp_hidden: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rope_theta: float

    @classmethod
    def from_hf(cls, cfg) -> Qwen2VisionConfig:
        """Parse an HF vision config object or config.json's `vision_config` dict."""
        embed_dim = int(config_value(cfg, "embed_dim"))
        return cls(
            depth=int(config_value(cfg, "depth")),
            embed_dim=embed_dim,
            out_hidden_size=int(config_value(cfg, "hidden_size")),
            num_heads=int(config_value(cfg, "num_heads", "num_attention_heads")),
            mlp_hidden=int(embed_dim * config_value(cfg, "mlp_ratio", default=4)),
            hidden_act=config_value(cfg, "hidden_act", default="quick_gelu"),
            in_channels=int(config_value(cfg, "in_channels", "in_chans", default=3)),
            patch_size=int(config_value(cfg, "patch_size", default=14)),
            temporal_patch_size=int(config_value(cfg, "temporal_patch_size", default=2)),
            spatial_merge_size=int(config_value(cfg, "spatial_merge_size", default=2)),
            rope_theta=rope_theta(cfg),
        )


class Qwen2VisionMLP(nn.Module):
    """fc1 -> activation (QuickGELU in Qwen2-VL) -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = Qwen2VisionMLP(cfg.embed_dim, cfg.mlp_hidden, cfg.hidden_act)

    def forward(self, x, rotary, meta: VisionAttentionMeta, backend) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, meta, backend)
        return x + self.mlp(self.norm2(x))


class Qwen2VisionTower(nn.Module):
    """Qwen2-VL vision encoder: `(pixel_values, grid_thw) -> [num_slots, out_hidden_size]`.

    `backend` is any attention backend with `varlen_attention` (default: torch reference).
    """

    # Each temporal patch (frame pair) of a video is computed alone: attention segments are one
    # per temporal patch (`full_attention_meta`), the rotary angles depend on a patch's row and
    # column only, and everything else is per patch or per merge block. So a video's rows equal
    # those of its temporal patches encoded apart (the engine's `split_media` relies on it).
    frames_attend_alone = True

    def __init__(self, cfg: Qwen2VisionConfig, backend=None) -> None:
        super().__init__()
        self.config = cfg
        self.spatial_merge_size = cfg.spatial_merge_size
        self.out_hidden_size = cfg.out_hidden_size
        self.attn_backend = backend if backend is not None else TorchAttentionBackend()
        self.patch_embed = PatchEmbed(
            cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.embed_dim
        )
        self.blocks = nn.ModuleList(Qwen2VisionBlock(cfg) for _ in range(cfg.depth))
        norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.embed_dim, cfg.spatial_merge_size, norm)

    @classmethod
    def from_config(
        cls, hf_vision_config, dtype=torch.float32, device="cpu", backend=None
    ) -> Qwen2VisionTower:
        """Build the tower from an HF vision config; parameters stay uninitialized until
        `load_weights`."""
        cfg = Qwen2VisionConfig.from_hf(hf_vision_config)
        return make_uninitialized(lambda: cls(cfg, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        """Load `(name, tensor)` pairs named as under `visual.` (prefix stripped).

        Raises ModelLoadError on missing, unexpected or mis-shaped tensors.
        """
        load_checked(self, named_tensors)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values `[num_patches, C*T*P*P]`, grid_thw int `[num_items, 3]` (t, h, w in
        patches) -> embeddings `[num_patches / merge^2, out_hidden_size]` in item order."""
        grid = grid_thw.tolist()
        device = pixel_values.device
        x = self.patch_embed(pixel_values)  # [num_patches, embed_dim]
        rows, cols = patch_coordinates(grid, self.spatial_merge_size, device)
        head_dim = self.config.embed_dim // self.config.num_heads
        rotary = fused_rotary_tables(*rotary_cos_sin(rows, cols, head_dim, self.config.rope_theta))
        meta = full_attention_meta(grid, device)
        for block in self.blocks:
            x = block(x, rotary, meta, self.attn_backend)
        return self.merger(x)  # [num_slots, out_hidden_size]
