"""`PixtralProcessor`: `[IMG]` placeholders for Pixtral-12B (transformers' LLaVA form) and
Mistral 3 (`Mistral3ForConditionalGeneration`).

Mirrors transformers' `PixtralProcessor` + `PixtralImageProcessor` (torchvision backend): an
image keeps its aspect ratio, shrunk (never grown) to fit `longest_edge` and rounded up to a
multiple of `patch_size * spatial_merge_size` (bicubic, antialiased), then normalized (CLIP
mean/std): both at staging, on the model's device (`llava_views.view_pixel_values`). Its
placeholder becomes one row of `[IMG]` per `patch * merge` pixels of height, each row ended by
`[IMG_BREAK]`, the last by `[IMG_END]`; only the `[IMG]` positions take embeddings
(`embed_mask`), the break and end tokens keep their own.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.llava_views import ViewPlan, view_pixel_values
from polymodal.processors.pixels import (
    decoded_pixels,
    image_processor_section,
    processor_section,
    scaled_mean_std,
)
from polymodal.processors.qwen_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from polymodal.processors.types import MultimodalItem


def pixtral_size(height: int, width: int, longest: int, patch: int) -> tuple[int, int]:
    """transformers' Pixtral `get_resize_output_image_size`: fit in `longest` x `longest`
    (shrinking only), then round each side up to a multiple of `patch`."""
    ratio = max(height / longest, width / longest)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((height - 1) // patch + 1) * patch, ((width - 1) // patch + 1) * patch


class PixtralProcessor(MediaProcessor):
    """Prompt + image processing for Pixtral and Mistral 3 checkpoints."""

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        own = processor_section(model_dir) if model_dir is not None else {}
        self.longest = int((section.get("size") or {}).get("longest_edge", 1024))
        self.unit = int(own.get("patch_size", 16)) * int(own.get("spatial_merge_size", 1))
        self.resample = int(section.get("resample", 3))
        self.mean, self.std = scaled_mean_std(
            section.get("image_mean", OPENAI_CLIP_MEAN),
            section.get("image_std", OPENAI_CLIP_STD),
            section.get("rescale_factor", 1 / 255),
        )
        self.placeholder = own.get("image_token", "[IMG]")
        self.break_token = own.get("image_break_token", "[IMG_BREAK]")
        self.end_token = own.get("image_end_token", "[IMG_END]")
        self.embed_token_id = tokenizer.convert_tokens_to_ids(self.placeholder)

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        frames, pixels = decoded_pixels(image, pixels_key)  # staging resizes (`llava_views`)
        size = pixtral_size(image.height, image.width, self.longest, self.unit)
        pixel_fn = partial(view_pixel_values, plan=ViewPlan(size, self.resample))
        rows, cols = size[0] // self.unit, size[1] // self.unit
        if rows == 0 or cols == 0:  # a side shrank to nothing (transformers fails there too)
            raise ValueError(f"the aspect ratio is too extreme (resized to {size[1]}x{size[0]})")
        knobs = [self.longest, self.unit, self.resample, *self.mean.tolist(), *self.std.tolist()]
        knobs = torch.tensor(knobs, dtype=torch.float64)
        key = {**pixels, "knobs": knobs}
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std}
        item = MultimodalItem(
            "image", data, -1, rows * cols, content_hash("image", key), pixel_fn=pixel_fn
        )
        expansion = (self.placeholder * cols + self.break_token) * rows
        return item, expansion[: -len(self.break_token)] + self.end_token
