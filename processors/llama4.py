"""`Llama4Processor`: `<|image|>` placeholders for Llama 4 (Scout / Maverick) checkpoints.

Mirrors transformers' `Llama4Processor` + `Llama4ImageProcessor` (torchvision backend): the
canvas is the best of the `tile x tile` grids of at most `max_patches` tiles (`get_best_fit`:
the smallest upscale, else the least downscale; ties to the smaller area); the image is
resized into it without distortion (bilinear; never upscaled past one tile unless
`resize_to_max_canvas`), zero-padded at the right and bottom, cut into tiles, and when there
is more than one tile a global view (the whole image squashed to one tile) comes last. Pixels
are rescaled and normalized in bfloat16, as the reference does. The resize, padding and tiling
run at staging, where the model is (`tiles_pixel_values`: on CUDA the upload is the decoded
image, not its tiles, and the host does no pixel work). The placeholder becomes
`<|image_start|>`, per tile row the tiles' `<|patch|>` runs (`<|tile_x_separator|>` between,
`<|tile_y_separator|>` after), then `<|image|>`, the global view's patches and `<|image_end|>`;
each tile gives `(tile / patch)^2 * pixel_shuffle_ratio^2` patch tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.pixels import (
    decoded_pixels,
    image_processor_section,
    processor_section,
    resize,
    split_tiles,
)
from polymodal.processors.types import MultimodalItem

MEDIA_DEFAULTS = {"max_patches": 16, "resize_to_max_canvas": False}


def supported_resolutions(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """transformers' `find_supported_resolutions`: every `rows x cols` grid of at most
    `max_tiles` tiles, in its order (grouped by aspect ratio, first seen first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for count in range(max_tiles, 0, -1):
        factors = sorted({f for i in range(1, int(count**0.5) + 1) if count % i == 0
                          for f in (i, count // i)})  # fmt: skip
        for rows in factors:
            by_ratio[rows / (count // rows)].append((rows, count // rows))
    return [(r * tile, c * tile) for grids in by_ratio.values() for r, c in grids]


def best_fit(size: tuple[int, int], canvases: list, to_max: bool) -> torch.Tensor:
    """transformers' `get_best_fit`, in float32 as it computes: the canvas `(h, w)` as the
    int64 `[2]` tensor it returns (its entries' type matters downstream)."""
    height, width = size
    options = torch.tensor(canvases)
    scale_w = options[:, 1] / width
    scale_h = options[:, 0] / height
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up):
        chosen = torch.max(up) if to_max else torch.min(up)
    else:
        chosen = torch.max(scales[scales < 1])
    picked = options[scales == chosen]
    return picked[torch.argmin(picked[:, 0] * picked[:, 1])] if len(picked) > 1 else picked[0]


def fit_without_distortion(size: tuple[int, int], target: tuple) -> tuple[int, int]:
    """transformers' `get_max_res_without_distortion` (floors, at least 1 pixel), with its
    arithmetic: `target`'s entries are Python ints or 0-dim int64 tensors as transformers
    passes them, and a tensor makes the scale float32, which floors differently from float64
    at some sizes (40x90 into 28x84: 63 px wide, not 62)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new = (min(math.floor(height * scale_w), target_h), target_w)
    else:
        new = (target_h, min(math.floor(width * scale_h), target_w))
    return int(max(new[0], 1)), int(max(new[1], 1))


@dataclass(frozen=True)
class TilesPlan:
    """How an image becomes its tiles: resized (`resample`) into `fitted` (h, w), zero-padded
    at the right and bottom to `canvas` (h, w), cut into `tile`-square tiles row-major, and,
    with more than one tile, the whole image squashed to one tile last."""

    fitted: tuple[int, int]
    canvas: tuple[int, int]
    tile: int
    resample: int


def tile_frames(frames: torch.Tensor, plan: TilesPlan) -> torch.Tensor:
    """Decoded uint8 `[1, 3, H, W]` -> its tiles `[tiles, 3, tile, tile]`, where `frames` are
    (on CUDA: staging's resize kernel, the CPU kernel's bits)."""
    fitted = resize(frames, plan.fitted, plan.resample)
    (height, width), tile = plan.canvas, plan.tile
    padded = F.pad(fitted, (0, width - fitted.shape[-1], 0, height - fitted.shape[-2]))
    rows, cols = height // tile, width // tile
    views = split_tiles(padded, rows, cols, tile)  # transformers' split_to_tiles
    if rows * cols > 1:  # the global view last
        views = torch.cat([views, resize(frames, (tile, tile), plan.resample)])
    return views


def tiles_pixel_values(frames, mean, std, dtype=torch.float32, *, plan: TilesPlan,
                       rescale: float = 1 / 255):  # fmt: skip
    """Pixel values `[tiles, 3, tile, tile]` in `dtype` (a `MultimodalItem.pixel_fn`): the
    tiles of `plan`, rescaled and normalized in bfloat16."""
    return bf16_normalize(tile_frames(frames, plan), mean, std, dtype, rescale)


def bf16_normalize(frames, mean, std, dtype=torch.float32, rescale: float = 1 / 255):
    """Llama 4's rescale + normalize in bfloat16 (`x.bf16() * r`, then `(x - mean) / std` in
    bfloat16), cast to `dtype`; wherever `frames` are."""
    x = frames.to(torch.bfloat16) * rescale
    mean = mean.to(x.device, torch.bfloat16).view(1, -1, 1, 1)
    std = std.to(x.device, torch.bfloat16).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std).to(dtype)


class Llama4Processor(MediaProcessor):
    """Prompt + image processing for Llama 4 checkpoints."""

    MEDIA_OPTIONS = tuple(MEDIA_DEFAULTS)

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        own = processor_section(model_dir) if model_dir is not None else {}
        size = section.get("size") or {"height": 336, "width": 336}
        self.tile = int(size["height"])
        self.resample = int(section.get("resample", 2))
        self.mean = torch.tensor(section.get("image_mean", (0.5, 0.5, 0.5)))
        self.std = torch.tensor(section.get("image_std", (0.5, 0.5, 0.5)))
        self.rescale = float(section.get("rescale_factor", 1 / 255))
        self.defaults = {
            "max_patches": int(section.get("max_patches", 16)),
            "resize_to_max_canvas": bool(section.get("resize_to_max_canvas", False)),
        }
        patch = int(own.get("patch_size", 14))
        # transformers saves neither the ratio nor the token names: it takes 0.5 and writes
        # the literal tokens below whatever its config says
        ratio = float(own.get("pixel_shuffle_ratio", 0.5))
        self.tokens_per_tile = (self.tile // patch) ** 2 // int(round(1.0 / ratio**2))
        self.placeholder = own.get("fake_image_token", "<|image|>")
        self.embed_token_id = tokenizer.convert_tokens_to_ids("<|patch|>")
        if self.embed_token_id is None or self.embed_token_id == tokenizer.unk_token_id:
            raise ModelLoadError("the Llama 4 tokenizer lacks the <|patch|> token")

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        opts = {**self.defaults, **options}
        frames, pixels = decoded_pixels(image, pixels_key)  # [1, 3, H, W]
        size = (image.height, image.width)
        max_patches = opts["max_patches"]
        if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
            raise InvalidInputError(f"max_patches must be an integer >= 1, got {max_patches!r}")
        canvases = supported_resolutions(max_patches, self.tile)
        best = best_fit(size, canvases, bool(opts["resize_to_max_canvas"]))  # int64 [2]
        target = (best[0], best[1])
        if not opts["resize_to_max_canvas"]:  # never upscale past one tile (same min / max
            # as transformers: each entry stays an int or becomes a tensor as there)
            target = tuple(min(max(s, self.tile), c) for s, c in zip(size, target))
        canvas = (int(best[0]), int(best[1]))
        plan = TilesPlan(fit_without_distortion(size, target), canvas, self.tile, self.resample)
        rows, cols = canvas[0] // self.tile, canvas[1] // self.tile
        knobs = [self.tile, self.resample, self.rescale, *self.mean.tolist(), *self.std.tolist()]
        knobs += [float(opts["max_patches"]), float(bool(opts["resize_to_max_canvas"]))]
        knobs = torch.tensor(knobs, dtype=torch.float64)
        key = {**pixels, "knobs": knobs}
        # the tiles are cut at staging, on the model's device (`tiles_pixel_values`)
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std}
        pixel_fn = partial(tiles_pixel_values, plan=plan, rescale=self.rescale)
        num_embeds = (rows * cols + (rows * cols > 1)) * self.tokens_per_tile
        item = MultimodalItem(
            "image", data, -1, num_embeds, content_hash("image", key), pixel_fn=pixel_fn
        )
        return item, self._expansion(rows, cols)

    def _expansion(self, rows: int, cols: int) -> str:
        patches = "<|patch|>" * self.tokens_per_tile
        text = "<|image_start|>"
        if rows * cols > 1:
            for _ in range(rows):
                text += "<|tile_x_separator|>".join([patches] * cols) + "<|tile_y_separator|>"
        return text + "<|image|>" + patches + "<|image_end|>"
