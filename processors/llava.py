"""LLaVA processors: `<image>` placeholders for LLaVA-1.5 and LLaVA-NeXT checkpoints.

Mirrors transformers' `LlavaProcessor` / `LlavaNextProcessor` with their torchvision image
processors (`CLIPImageProcessor` / `LlavaImageProcessor`, `LlavaNextImageProcessor`):
- LLaVA-1.5: optionally pad to a square with the mean colour (`do_pad`), resize the shortest
  edge to `size`, center-crop to `crop_size`, normalize (CLIP mean/std). The placeholder
  becomes `(crop / patch)^2 (+ num_additional_image_tokens, - 1 with the "default" feature
  strategy)` `<image>` tokens.
- LLaVA-NeXT ("anyres"): the image is resized to fit the best of `image_grid_pinpoints`
  (aspect kept, `select_best_resolution`), zero-padded to it and cut into `crop_size` tiles;
  with the whole image squashed to `crop_size` first. The placeholder becomes the base view's
  tokens plus one per unpadded feature of the tile grid and one newline per feature row.
  The processor hands the encoder that geometry (`data["tile_layout"]`; LLaVA-OneVision,
  `llava_onevision.py`, adds a smaller size to resample the unpadded map to).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.pixels import (
    image_processor_section,
    image_to_frames,
    normalize_frames,
    processor_section,
    resize,
    scaled_mean_std,
    split_tiles,
)
from polymodal.processors.qwen_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from polymodal.processors.types import MultimodalItem


def select_best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """transformers' `select_best_resolution`: of the (height, width) pinpoints, the one that
    keeps the most of the image (downscaled to fit) and wastes the least."""
    height, width = size
    best, most, least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: `size` scaled to fit `target`, aspect kept."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_box(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, height, left, width) of a `rows x cols` feature map that the image covers (the
    rest is the processor's padding), as transformers' `unpad_image` cuts it."""
    height, width = size
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        pad = (rows - new_height) // 2
        return pad, rows - 2 * pad, 0, cols
    new_width = int(round(width * (rows / height), 7))
    pad = (cols - new_width) // 2
    return 0, rows, pad, cols - 2 * pad


def shortest_edge_size(size: tuple[int, int], shortest: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(..., default_to_square=False)`."""
    height, width = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' torchvision `center_crop` (zero padding when the crop is larger)."""
    height, width = frames.shape[-2:]
    crop_h, crop_w = size
    if crop_w > width or crop_h > height:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        frames = F.pad(frames, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = frames.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return frames[..., top : top + crop_h, left : left + crop_w]


class LlavaProcessor(MediaProcessor):
    """Prompt + image processing for LLaVA-1.5 (`LlavaForConditionalGeneration`)."""

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        own = processor_section(model_dir) if model_dir is not None else {}
        size = section.get("size") or {"shortest_edge": 224}
        self.shortest = int(size.get("shortest_edge") or min(size["height"], size["width"]))
        crop = section.get("crop_size") or {"height": self.shortest, "width": self.shortest}
        self.crop = (int(crop["height"]), int(crop["width"]))
        self.do_center_crop = section.get("do_center_crop", True)
        self.do_pad = bool(section.get("do_pad", False))
        self.resample = int(section.get("resample", 3))
        mean = section.get("image_mean", OPENAI_CLIP_MEAN)
        self.pad_colour = [int(x * 255) for x in mean]
        self.mean, self.std = scaled_mean_std(
            mean, section.get("image_std", OPENAI_CLIP_STD), section.get("rescale_factor", 1 / 255)
        )
        self.patch_size = int(own.get("patch_size") or 14)
        self.extra_tokens = int(own.get("num_additional_image_tokens", 0))
        self.drop_cls = own.get("vision_feature_select_strategy") == "default"
        image_token = getattr(tokenizer, "image_token", None)
        self.placeholder = image_token or own.get("image_token", "<image>")
        self.embed_token_id = tokenizer.convert_tokens_to_ids(self.placeholder)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any):
        """LLaVA-1.5's processor, or Pixtral's for Pixtral checkpoints in the LLaVA form."""
        if processor_section(model_dir).get("processor_class") == "PixtralProcessor":
            from polymodal.processors.pixtral import PixtralProcessor

            return PixtralProcessor.from_pretrained(model_dir, **kwargs)
        return super().from_pretrained(model_dir, **kwargs)

    def tokens_per_view(self, height: int, width: int) -> int:
        count = (height // self.patch_size) * (width // self.patch_size) + self.extra_tokens
        return count - 1 if self.drop_cls else count

    def _square(self, frames: torch.Tensor) -> torch.Tensor:
        """LlavaImageProcessor's `pad_to_square`: centred on the mean colour."""
        height, width = frames.shape[-2:]
        if height == width:
            return frames
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        out = frames.new_empty((*frames.shape[:-2], side, side))
        out[...] = torch.tensor(self.pad_colour, dtype=frames.dtype).view(-1, 1, 1)
        out[..., top : top + height, left : left + width] = frames
        return out

    def image_item(self, image, options: dict[str, Any]) -> tuple[MultimodalItem, str]:
        frames = image_to_frames(image)
        if self.do_pad:
            frames = self._square(frames)
        frames = resize(frames, shortest_edge_size(frames.shape[-2:], self.shortest), self.resample)
        if self.do_center_crop:
            frames = center_crop(frames, self.crop)
        knobs = [self.shortest, *self.crop, self.do_pad, self.resample]
        item = self._item(image, frames, knobs, self.tokens_per_view(*frames.shape[-2:]), {})
        return item, self.placeholder * item.num_slots

    def _item(self, image, frames, knobs, num_embeds, extra) -> MultimodalItem:
        knobs = [*knobs, *self.mean.tolist(), *self.std.tolist()]
        knobs = torch.tensor(knobs, dtype=torch.float64)
        key = {"frames": image_to_frames(image)[0], "knobs": knobs}
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std, **extra}
        return MultimodalItem(
            "image", data, -1, num_embeds, content_hash("image", key), pixel_fn=normalize_frames
        )


class LlavaNextProcessor(LlavaProcessor):
    """Prompt + image processing for LLaVA-NeXT (anyres tiling)."""

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, model_dir=model_dir, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        pinpoints = section.get("image_grid_pinpoints") or [
            [336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008],
        ]  # fmt: skip
        self.pinpoints = [tuple(p) for p in pinpoints]
        size = section.get("size") or {"shortest_edge": 224}
        side = size.get("shortest_edge") or size["height"]
        self.view = (int(side), int(side))  # the base view: the whole image, squashed
        self.tile = self.crop[0]
        self.feature_side = self.tile // self.patch_size  # features per tile side

    def image_item(self, image, options: dict[str, Any]) -> tuple[MultimodalItem, str]:
        size = (image.height, image.width)
        views, (rows, cols) = self.anyres_views(image_to_frames(image), size)
        layout = self.tile_layout(size, rows, cols)
        base = self.tokens_per_view(*views.shape[-2:])
        out_height, out_width = layout[6:]
        num_embeds = base + out_height * (out_width + 1)  # a newline ends each feature row
        knobs = [*self.view, self.tile, self.resample, *(v for p in self.pinpoints for v in p)]
        extra = {"tile_layout": torch.tensor(layout, dtype=torch.int64)}
        item = self._item(image, views, knobs, num_embeds, extra)
        return item, self.placeholder * num_embeds

    def tile_layout(self, size: tuple[int, int], rows: int, cols: int) -> list[int]:
        """(rows, cols, top, height, left, width, out_height, out_width): the tile grid, the
        crop of its `(rows * side) x (cols * side)` feature map that holds the image (no
        padding), and the size that crop is resampled to (LLaVA-NeXT: its own)."""
        side = self.feature_side
        box = unpad_box(size, rows * side, cols * side)
        return [rows, cols, *box, box[1], box[3]]

    def anyres_views(self, frames: torch.Tensor, size: tuple[int, int]):
        """`[1, 3, H, W]` -> (the base view and the tiles `[1 + rows * cols, 3, t, t]`,
        (rows, cols))."""
        best = select_best_resolution(size, self.pinpoints)
        fitted = resize(frames, fit_size(size, best), self.resample)
        # zero padding, centred (transformers' `_pad_for_patching`)
        pad_h, pad_w = best[0] - fitted.shape[-2], best[1] - fitted.shape[-1]
        padded = F.pad(fitted, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        rows, cols = best[0] // self.tile, best[1] // self.tile
        tiles = split_tiles(padded, rows, cols, self.tile)
        views = torch.cat([resize(frames, self.view, self.resample), tiles])
        if (self.tile, self.tile) != self.view or self.crop != self.view:  # as transformers
            size = shortest_edge_size(views.shape[-2:], self.shortest)
            views = center_crop(resize(views, size, self.resample), self.crop)
        return views, (rows, cols)
