"""LLaVA-family image encoders: a CLIP (or SigLIP) tower read at `vision_feature_layer`, the
two-layer projector, and for LLaVA-NeXT / LLaVA-OneVision the anyres packing.

- LLaVA-1.5 (`LlavaForConditionalGeneration`): one 336 px image -> its patch features (the
  class token dropped with `vision_feature_select_strategy="default"`), projected.
- LLaVA-NeXT (`LlavaNextForConditionalGeneration`): the image's base view and its grid of
  tiles run through the tower together; the tiles' features are laid back into one
  `(rows * side) x (cols * side)` map, the padding the processor added is cut off again
  (`unpad`), a learned `image_newline` column is appended to every row, and the base view's
  features come first (transformers' `pack_image_features`). The processor, which counts the
  tokens, computes that geometry and hands it over in `data["tile_layout"]`.
- LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, SigLIP tower): LLaVA-NeXT's
  packing, where the unpadded map is first resampled (bilinear) to the smaller size the
  processor names when it holds more than `anyres_max_N` tiles' worth; an image that is one
  of several is one view and a newline. A video's frames each go through the tower, their
  maps pooled 2x2 (bilinear, to `ceil(side / 2)` a side), one newline after the last frame.

Names follow transformers': `vision_tower.*`, `multi_modal_projector.linear_{1,2}`,
`image_newline`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.clip import ClipVisionTower
from polymodal.encoders.siglip import SiglipVisionTower
from polymodal.encoders.vision_layers import get_activation, load_checked, make_uninitialized
from polymodal.llm_core.attention import TorchAttentionBackend

# vision_config.model_type -> the tower (both take a list of feature layers)
TOWERS = {"clip_vision_model": ClipVisionTower, "siglip_vision_model": SiglipVisionTower}


class LlavaProjector(nn.Module):
    """linear_1 -> activation -> linear_2 (HF's `LlavaMultiModalProjector`)."""

    def __init__(self, hf_config, in_dim: int) -> None:
        super().__init__()
        text = hf_config.get_text_config()
        bias = getattr(hf_config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(in_dim, text.hidden_size, bias=bias)
        self.act = get_activation(hf_config.projector_hidden_act)
        self.linear_2 = nn.Linear(text.hidden_size, text.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def feature_layers(hf_config) -> list[int]:
    layers = hf_config.vision_feature_layer
    return [layers] if isinstance(layers, int) else list(layers)


class LlavaEncoder(nn.Module):
    """LLaVA-1.5: each image -> `(S/p)^2` projected patch features (+1 with the "full"
    strategy, which keeps the class token)."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        backend = backend if backend is not None else TorchAttentionBackend()
        vision = hf_config.vision_config
        self.layers = feature_layers(hf_config)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"
        tower = TOWERS.get(vision.model_type)
        if tower is None:
            raise ValueError(
                f"vision_config.model_type {vision.model_type!r} is not served for LLaVA; "
                f"known: {sorted(TOWERS)}"
            )
        self.vision_tower = tower(vision, backend)
        width = vision.hidden_size * len(self.layers)  # the chosen layers, concatenated
        self.multi_modal_projector = LlavaProjector(hf_config, width)
        self.graphs = None  # EncoderGraphs of `features` once the decoder's are captured

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's config (Pixtral towers get their own encoder)."""
        if hf_config.vision_config.model_type == "pixtral":
            from polymodal.encoders.pixtral import PixtralLlavaEncoder

            return PixtralLlavaEncoder.from_config(hf_config, dtype, device, backend)
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, C, S, S]` -> projected features `[N, tokens, text_dim]`."""
        states = self.vision_tower(pixel_values, self.layers)
        if self.drop_cls:
            states = states[:, 1:]
        return self.multi_modal_projector(states)

    def encode(self, items: list) -> list[torch.Tensor]:
        pixels = torch.cat([it.data["pixel_values"] for it in items])  # [N, C, S, S]
        return list((self.graphs or self.features)(pixels).unbind(0))


class LlavaNextEncoder(LlavaEncoder):
    """LLaVA-NeXT: base view + anyres tiles -> packed features with newline embeddings."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__(hf_config, backend)
        self.image_newline = nn.Parameter(torch.empty(hf_config.get_text_config().hidden_size))
        vision = hf_config.vision_config
        self.side = vision.image_size // vision.patch_size  # features per tile side

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call for every view of every item; then each item's packing."""
        views = [it.data["pixel_values"] for it in items]  # [views, C, S, S] each
        features = (self.graphs or self.features)(torch.cat(views))
        features = features.split([v.shape[0] for v in views])
        return [self.rows(f, it) for f, it in zip(features, items)]

    def rows(self, features: torch.Tensor, item) -> torch.Tensor:
        """One item's slot rows from its views' features `[views, side^2, dim]`."""
        layout = item.data.get("tile_layout")
        return self.pack(features, layout.tolist() if layout is not None else None)

    def pack(self, features: torch.Tensor, layout: list[int] | None) -> torch.Tensor:
        """`[1 + tiles, side^2, dim]` -> `[base + out_height * (out_width + 1), dim]` (HF's
        packing); `layout` = (rows, cols, top, height, left, width, out_height, out_width): the
        tile grid, the crop of the `(rows * side) x (cols * side)` feature map that holds the
        image (no padding), and the size it is resampled to (bilinear) when that differs."""
        base, tiles = features[0], features[1:]
        if tiles.shape[0] == 0:  # a single view: its features and one newline
            return torch.cat([base, self.image_newline[None].to(base)])
        rows, cols, top, height, left, width, out_height, out_width = layout
        side, dim = self.side, features.shape[-1]
        # [rows, cols, side, side, dim] -> [rows * side, cols * side, dim]
        grid = tiles.view(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * side, cols * side, dim)
        grid = grid[top : top + height, left : left + width]
        if (out_height, out_width) != (height, width):
            grid = resample(grid, (out_height, out_width))
        newline = self.image_newline.to(grid)[None, None].expand(out_height, 1, dim)
        return torch.cat([base, torch.cat([grid, newline], dim=1).flatten(0, 1)])


def resample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a `[height, width, dim]` feature map to `size` (transformers'
    `interpolate(..., mode="bilinear")`: corners not aligned, no antialiasing)."""
    maps = grid.permute(2, 0, 1)[None]  # [1, dim, height, width]
    return F.interpolate(maps, size=size, mode="bilinear")[0].permute(1, 2, 0)


class LlavaOnevisionEncoder(LlavaNextEncoder):
    """LLaVA-OneVision: LLaVA-NeXT's images (maps resampled to the processor's size) and
    videos (per frame 2x2 bilinear pooling, one newline after the video)."""

    def rows(self, features: torch.Tensor, item) -> torch.Tensor:
        if item.modality != "video":
            return super().rows(features, item)
        frames, side, dim = features.shape[0], self.side, features.shape[-1]
        if features.shape[1] != side * side:
            raise ValueError(
                f"video frames give {features.shape[1]} features, not a {side}x{side} map "
                "(a 'default' feature strategy drops one: videos need 'full')"
            )
        pooled = math.ceil(side / 2)
        maps = features.view(frames, side, side, dim).permute(0, 3, 1, 2)  # [T, dim, side, side]
        maps = F.interpolate(maps, size=(pooled, pooled), mode="bilinear")
        rows = maps.permute(0, 2, 3, 1).reshape(frames * pooled * pooled, dim)
        return torch.cat([rows, self.image_newline[None].to(rows)])
