"""`HCXVisionProcessor`: prompts with images for HyperCLOVA X SEED Vision (`HCXVisionForCausalLM`).

Mirrors the published image processor (the hub's `HCXVisionImageProcessor`, a CLIP-style
processor with anyres; every resize is PIL's, bicubic by default):
- global view: the image's long side resized to `size.shortest_edge` (the other side
  `ceil`-ed) and padded to a square, centred, on the mean colour (`pad_to_square`), else
  squashed to a square;
- tiles: the best of `possible_resolutions` (LLaVA-NeXT's `select_best_resolution`; from
  preprocessor_config.json, else every grid of at most `max_num_grids` tiles of the tower's
  size, 1 x 1 only with `use_1x1_grid`), the image resized to fit it (aspect kept, `ceil`),
  padded centred on the mean colour, cut into `crop_size` tiles row-major;
- each grid resized to `shortest_edge` and centre-cropped to `crop_size` (no-ops when the
  sizes agree), rescaled and normalized.
An image takes `q * q` tokens for the global view (q = sqrt(`num_queries_vis_abstractor_image`))
plus, per row of the tiles' `(rows * q) x (cols * q)` query map, its columns: cropped to the
image and one newline more per row with `unpad` (the published `determine_anyres_num_vision_
patches`, `int` truncations included). The prompt marks an image with `<|dummy3|>`, which the
chat template renders inside the image's turns; it expands to one `<|dummy3|>` per token.

Video (frames combined onto 3 x 3 canvases, slow / fast query counts) is not served: its frame
sampling, canvas layout and prompt block live in the hub's `processing_hyperclovax.py`, which
could not be read; vLLM and TensorRT-LLM call that file rather than reproduce it
(docs/models.md); a video part is refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from polymodal.llm_core.errors import ModelLoadError
from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.llava import fit_size, select_best_resolution
from polymodal.processors.pixels import (
    image_processor_section,
    normalize_frames,
    pixels_part,
    scaled_mean_std,
)
from polymodal.processors.qwen_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from polymodal.processors.types import MultimodalItem

IMAGE_TOKEN = "<|dummy3|>"
# the published `_get_local_grids_output_size` is LLaVA-NeXT's `fit_size` (same maths)


def possible_resolutions(max_num_grids: int, grid: int, use_1x1_grid: bool) -> list[tuple]:
    """(height, width) of every `i x j` grid of `grid` px tiles with `i * j <= max_num_grids`
    (rows-major order; 1 x 1 only with `use_1x1_grid`), as the published code lists them."""
    span = range(1, max_num_grids + 1)
    grids = [(i, j) for i in span for j in span if i * j <= max_num_grids]
    return [(i * grid, j * grid) for i, j in grids if (i, j) != (1, 1) or use_1x1_grid]


def unpad_box(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, height, left, width) of the `rows x cols` query map that the (h, w) image covers,
    as the published `unpad_image` cuts it (`int` truncation, no rounding)."""
    height, width = size
    if width / height > cols / rows:
        pad = (rows - int(height * (cols / width))) // 2
        return pad, rows - 2 * pad, 0, cols
    pad = (cols - int(width * (rows / height))) // 2
    return 0, rows, pad, cols - 2 * pad


def paste_centred(image: Image.Image, size: tuple[int, int], colour: tuple) -> Image.Image:
    """`image` on a (h, w) canvas of `colour`, centred (the published `pad` / `expand2square`)."""
    height, width = size
    if (image.height, image.width) == (height, width):
        return image
    canvas = Image.new("RGB", (width, height), colour)
    canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return canvas


class HCXVisionProcessor(MediaProcessor):
    """Prompt + image processing for HyperCLOVA X SEED Vision (see the module docstring)."""

    placeholder = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        model_dir = Path(model_dir) if model_dir is not None else None
        section = image_processor_section(model_dir) if model_dir is not None else {}
        config = json.loads((model_dir / "config.json").read_text()) if model_dir else {}
        crop = section.get("crop_size") or {"height": 336, "width": 336}
        if crop["height"] != crop["width"]:
            raise ModelLoadError(f"crop_size must be square, got {crop}")
        self.crop = int(crop["height"])
        size = section.get("size") or {"shortest_edge": 336}
        self.size = int(size.get("shortest_edge") or size["height"])
        if self.size < self.crop:
            raise ModelLoadError(f"size {size} is smaller than crop_size {crop}")
        self.resample = int(section.get("resample", 3))
        self.pad_to_square = bool(section.get("pad_to_square", True))
        mean = section.get("image_mean", OPENAI_CLIP_MEAN)
        self.pad_colour = tuple(int(x * 255) for x in mean)
        self.mean, self.std = scaled_mean_std(
            mean, section.get("image_std", OPENAI_CLIP_STD), section.get("rescale_factor", 1 / 255)
        )
        self.anyres = bool(config.get("anyres", False))
        self.unpad = bool(config.get("unpad", False))
        self.side = math.isqrt(int(config.get("num_queries_vis_abstractor_image", 0)))
        if self.side < 1:
            raise ModelLoadError("config.json lacks num_queries_vis_abstractor_image")
        resolutions = section.get("possible_resolutions") or possible_resolutions(
            int(config.get("max_num_grids", -1)), self.crop, bool(config.get("use_1x1_grid"))
        )
        self.resolutions = [tuple(r) for r in resolutions]
        if self.anyres and not self.resolutions:
            raise ModelLoadError("anyres needs possible_resolutions or max_num_grids > 0")
        token_id = config.get("image_token_id")
        self.embed_token_id = token_id if token_id is not None else (
            tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        )  # fmt: skip

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """PIL resize to (h, w), as transformers' `resize` on a uint8 image (same size: a copy)."""
        if (image.height, image.width) == size:
            return image
        return image.resize((size[1], size[0]), resample=self.resample)

    def global_view(self, image: Image.Image) -> Image.Image:
        if not self.pad_to_square:
            return self._resize(image, (self.size, self.size))
        width, height = image.size
        if width > height:
            long_side = (math.ceil(height / width * self.size), self.size)
        elif height > width:
            long_side = (self.size, math.ceil(width / height * self.size))
        else:
            long_side = (self.size, self.size)
        view = self._resize(image, long_side)
        side = max(view.size)
        return paste_centred(view, (side, side), self.pad_colour)

    def tiles(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """The best grid's tiles (row-major) and its rows, cols."""
        best = select_best_resolution((image.height, image.width), self.resolutions)
        fitted = self._resize(image, fit_size((image.height, image.width), best))
        padded = paste_centred(fitted, best, self.pad_colour)
        rows, cols = best[0] // self.crop, best[1] // self.crop
        boxes = [(c * self.crop, r * self.crop) for r in range(rows) for c in range(cols)]
        tiles = [padded.crop((x, y, x + self.crop, y + self.crop)) for x, y in boxes]
        return tiles, rows, cols

    def finish_grid(self, grid: Image.Image) -> np.ndarray:
        """Shortest edge to `size`, centre crop to `crop_size`: HWC uint8."""
        width, height = grid.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        grid = self._resize(
            grid, (self.size, new_long) if height <= width else (new_long, self.size)
        )
        top, left = (grid.height - self.crop) // 2, (grid.width - self.crop) // 2
        return np.asarray(grid)[top : top + self.crop, left : left + self.crop]

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        q = self.side
        extra = {}
        if self.anyres:
            tiles, rows, cols = self.tiles(image)
            grids = [self.global_view(image), *tiles]
            box = unpad_box((image.height, image.width), rows * q, cols * q)
            if not self.unpad:
                box = (0, rows * q, 0, cols * q)
            num_embeds = q * q + box[1] * (box[3] + int(self.unpad))
            extra["tile_layout"] = torch.tensor([rows, cols, *box], dtype=torch.int64)
        else:
            grids = [self.global_view(image) if self.pad_to_square else image]
            num_embeds = q * q
        frames = np.stack([self.finish_grid(g) for g in grids])  # [G, S, S, 3]
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [G, 3, S, S]
        knobs = [self.size, self.crop, self.resample, self.pad_to_square, q, self.unpad]
        knobs += [v for r in self.resolutions for v in r] + self.mean.tolist() + self.std.tolist()
        key = {**pixels_part(image, pixels_key), "knobs": torch.tensor(knobs, dtype=torch.float64)}
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std, **extra}
        item = MultimodalItem(
            "image", data, -1, num_embeds, content_hash("image", key), pixel_fn=normalize_frames
        )
        return item, self.placeholder * num_embeds
