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

from functools import partial
from pathlib import Path
from typing import Any

import torch

from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.llava_views import (
    AnyresPlan,
    ViewPlan,
    anyres_pixel_values,
    fit_size,  # noqa: F401 (re-exported: HyperCLOVA X's processor takes it from here)
    plan_anyres,
    select_best_resolution,  # noqa: F401 (re-exported, as fit_size)
    shortest_edge_size,
    view_pixel_values,
)
from polymodal.processors.pixels import (
    decoded_pixels,
    image_processor_section,
    processor_section,
    scaled_mean_std,
)
from polymodal.processors.qwen_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from polymodal.processors.types import MultimodalItem


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

    def embeds_expansion(self, num_rows: int) -> str:
        """An image given as its projected rows: one image token each (vLLM's)."""
        return self.placeholder * num_rows

    def tokens_per_view(self, height: int, width: int) -> int:
        count = (height // self.patch_size) * (width // self.patch_size) + self.extra_tokens
        return count - 1 if self.drop_cls else count

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        size = (image.height, image.width)
        if self.do_pad:  # squared with the mean colour first
            size = (max(size), max(size))
        crop = self.crop if self.do_center_crop else None
        resized = shortest_edge_size(size, self.shortest)
        square = tuple(self.pad_colour) if self.do_pad else None
        plan = ViewPlan(resized, self.resample, square, crop)
        knobs = [self.shortest, *self.crop, self.do_pad, self.resample]
        num_embeds = self.tokens_per_view(*(crop or resized))
        pixel_fn = partial(view_pixel_values, plan=plan)
        item = self._item(image, pixels_key, pixel_fn, knobs, num_embeds, {})
        return item, self.placeholder * item.num_slots

    def _item(self, image, pixels_key, pixel_fn, knobs, num_embeds, extra) -> MultimodalItem:
        """An item that keeps the decoded frames; `pixel_fn` (a `llava_views` recipe) makes
        the pixel values at staging, on the model's device. Hashed as decoded, with the knobs
        that decide its views (the plan follows from them and the image's size)."""
        knobs = [*knobs, *self.mean.tolist(), *self.std.tolist()]
        knobs = torch.tensor(knobs, dtype=torch.float64)
        frames, pixels = decoded_pixels(image, pixels_key)  # uint8 [1, 3, H, W]
        key = {**pixels, "knobs": knobs}
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std, **extra}
        return MultimodalItem(
            "image", data, -1, num_embeds, content_hash("image", key), pixel_fn=pixel_fn
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

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        size = (image.height, image.width)
        plan = self.anyres_plan(size)
        layout = self.tile_layout(size, *plan.grid)
        base = self.tokens_per_view(*(plan.recrop[1] if plan.recrop else plan.view))
        out_height, out_width = layout[6:]
        num_embeds = base + out_height * (out_width + 1)  # a newline ends each feature row
        knobs = [*self.view, self.tile, self.resample, *(v for p in self.pinpoints for v in p)]
        extra = {"tile_layout": torch.tensor(layout, dtype=torch.int64)}
        pixel_fn = partial(anyres_pixel_values, plan=plan)
        item = self._item(image, pixels_key, pixel_fn, knobs, num_embeds, extra)
        return item, self.placeholder * num_embeds

    def tile_layout(self, size: tuple[int, int], rows: int, cols: int) -> list[int]:
        """(rows, cols, top, height, left, width, out_height, out_width): the tile grid, the
        crop of its `(rows * side) x (cols * side)` feature map that holds the image (no
        padding), and the size that crop is resampled to (LLaVA-NeXT: its own)."""
        side = self.feature_side
        box = unpad_box(size, rows * side, cols * side)
        return [rows, cols, *box, box[1], box[3]]

    def anyres_plan(self, size: tuple[int, int]) -> AnyresPlan:
        """Where an image of `size` (h, w) goes: its base view and tile grid (`llava_views`)."""
        return plan_anyres(
            size, self.pinpoints, self.tile, self.view, self.resample, self.shortest, self.crop
        )
