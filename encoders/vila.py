"""VILA / NVILA media encoder (`LlavaLlamaModel`): the SigLIP tower read at
`mm_vision_select_layer`, NVILA's dynamic-S2 multi-scale merge, the `mm_projector`, and the
video encoder's temporal / spatial pooling (TSP).

What the processor hands over per item (`processors/vila.py` counts the tokens):
- an image as one or more independent views `[views, 3, S, S]` (VILA 1.5's resized image,
  NVILA-Lite's `dynamic` tiles, NVILA's images when a prompt has several): each view's
  features are projected on their own. On a dynamic-S2 model a view's features are repeated
  once per scale along the channels first (the public code's `block_size=None` case).
- NVILA's single image (`data["block_size"] = (rows, cols)`): the tiles of every scale (one
  448 view, the 2 x 2 tiles at 896, the rows x cols grid of the last scale), whose features are
  stitched back per scale into one map, area-resized to the last scale's map, concatenated
  along the channels, cut into rows x cols tiles again for the projector, and the projected
  tiles stitched into one raster: `rows * cols * tokens` embeddings in image raster order.
- a video `[T, 3, S, S]`: each frame as one view, then per `pool_sizes` entry (pt, ph, pw) the
  frames averaged in groups of pt and the token grid in ph x pw blocks (`temporal_spatial_pool`).
  The frame separators (start / end / sep tokens) are text tokens in the prompt.

Names follow the checkpoint's (`vision_tower.*` as SigLIP's `vision_model.*`, `mm_projector.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.siglip import SiglipVisionTower
from polymodal.encoders.vila_projector import VilaProjector, temporal_spatial_pool
from polymodal.encoders.vision_layers import load_checked, make_uninitialized
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.errors import ModelLoadError


def merge_tiles(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`[rows * cols, C, h, w]` row-major tiles -> one `[C, rows * h, cols * w]` map."""
    _, dim, h, w = tiles.shape
    grid = tiles.view(rows, cols, dim, h, w).permute(2, 0, 3, 1, 4)
    return grid.reshape(dim, rows * h, cols * w)


def split_tiles(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`[C, rows * h, cols * w]` -> `[rows * cols, C, h, w]` row-major tiles."""
    dim, height, width = grid.shape
    h, w = height // rows, width // cols
    tiles = grid.view(dim, rows, h, cols, w).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, dim, h, w)


class VilaEncoder(nn.Module):
    """Images and videos of a VILA / NVILA checkpoint -> decoder embeddings per item."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        backend = backend if backend is not None else TorchAttentionBackend()
        vision = hf_config.vision_config
        if getattr(vision, "model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ModelLoadError(
                f"VILA with a {vision.model_type!r} vision tower is not supported (SigLIP only)"
            )
        if getattr(hf_config, "mm_vision_select_feature", "cls_patch") != "cls_patch":
            raise ModelLoadError(
                "mm_vision_select_feature must be 'cls_patch' for a SigLIP tower (it has no "
                f"class token to drop), got {hf_config.mm_vision_select_feature!r}"
            )
        if getattr(hf_config, "s2", False) and not hf_config.dynamic_s2:
            raise ModelLoadError("VILA's fixed S2 (`s2: true`, s2wrapper) is not supported")
        self.layer = int(getattr(hf_config, "mm_vision_select_layer", -2))
        self.side = vision.image_size // vision.patch_size  # features per view side
        self.scales = list(hf_config.s2_scales) if hf_config.dynamic_s2 else []
        self.out_scale = int(getattr(hf_config, "s2_resize_output_to_scale_idx", 0))
        self.pool_sizes = [tuple(p) for p in hf_config.video_pool_sizes]
        width = vision.hidden_size * max(1, len(self.scales))
        kind = hf_config.mm_projector_cfg["mm_projector_type"]
        self.vision_tower = SiglipVisionTower(vision, backend)
        self.mm_projector = VilaProjector(kind, width, hf_config.get_text_config().hidden_size)

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `VilaConfig`; weights come from the model's loader."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call and one projector call for every view of every item."""
        views = [it.data["pixel_values"] for it in items]  # [views, 3, S, S] each
        features = self.vision_tower(torch.cat(views), self.layer)  # [N, side^2, D]
        inputs, plans = [], []
        for feats, item in zip(features.split([v.shape[0] for v in views]), items):
            block = item.data.get("block_size")
            rows, cols = (int(x) for x in block.tolist()) if block is not None else (0, 0)
            if rows:
                feats = self.multi_scale(feats, rows, cols)
                rows, cols = self.output_block(rows, cols)
            elif self.scales:  # one view of a dynamic-S2 model: its features once per scale
                feats = feats.repeat(1, 1, len(self.scales))
            inputs.append(feats)
            plans.append((item, rows, cols))
        projected = self.mm_projector(torch.cat(inputs))  # [N', tokens, hidden]
        out = []
        for tokens, (item, rows, cols) in zip(projected.split([len(x) for x in inputs]), plans):
            if rows:  # tiles back into one raster of the whole image
                grid = tokens.transpose(1, 2)  # [tiles, hidden, tokens]
                n = math.isqrt(tokens.shape[1])
                grid = merge_tiles(grid.reshape(*grid.shape[:2], n, n), rows, cols)
                out.append(grid.flatten(1).transpose(0, 1))
            elif item.modality == "video" and self.pool_sizes:  # each pool's frames in turn
                pooled = [temporal_spatial_pool(tokens, p).flatten(0, 1) for p in self.pool_sizes]
                out.append(torch.cat(pooled))
            else:
                out.append(tokens.flatten(0, 1))
        return out

    def multi_scale(self, tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Dynamic S2: `[tiles, side^2, D]` of every scale -> the projector's input
        `[rows' * cols', side^2, D * scales]` (the merged maps, cut again)."""
        side, dim = self.side, tiles.shape[-1]
        maps = tiles.transpose(1, 2).reshape(-1, dim, side, side)  # [tiles, D, side, side]
        merged, start = [], 0
        for scale in self.scales[:-1]:
            k = scale // self.scales[0]
            merged.append(merge_tiles(maps[start : start + k * k], k, k))
            start += k * k
        merged.append(merge_tiles(maps[start : start + rows * cols], rows, cols))
        if start + rows * cols != maps.shape[0]:
            raise ValueError(f"dynamic S2 got {maps.shape[0]} tiles for a {rows}x{cols} grid")
        size = merged[self.out_scale].shape[-2:]
        # area resize in float32, as the reference (F.interpolate "area")
        resized = [
            F.interpolate(m[None].float(), size=size, mode="area")[0].to(m.dtype) for m in merged
        ]
        grid = torch.cat(resized)  # [D * scales, H, W]
        out_rows, out_cols = self.output_block(rows, cols)
        cut = split_tiles(grid, out_rows, out_cols)  # [tiles, D * scales, side, side]
        return cut.flatten(2).transpose(1, 2)

    def output_block(self, rows: int, cols: int) -> tuple[int, int]:
        """The tile grid the merged map is cut into: the last scale's, or the chosen scale's."""
        if self.out_scale in (-1, len(self.scales) - 1):
            return rows, cols
        k = self.scales[self.out_scale] // self.scales[0]
        return k, k
