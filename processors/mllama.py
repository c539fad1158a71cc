"""`MllamaProcessor`: prompts with images for `MllamaForConditionalGeneration` (Llama 3.2
Vision).

Mirrors transformers' `MllamaProcessor` + `MllamaImageProcessor` (torchvision backend): each
`<|image|>` stays one token (its image reaches the decoder through cross-attention, not slots);
a raw prompt gets `<|begin_of_text|>` after its leading image tokens unless it has one. An image
is resized (bilinear, antialiased, aspect kept) to fit the best canvas of `w x h` tiles
(`w * h <= max_image_tiles`; the smallest upscale, else the largest downscale, then the
smallest area), zero-padded to the canvas, cut into `size` tiles (row-major), normalized, and
padded with zero tiles to `max_image_tiles`; its aspect ratio id is the canvas's index among
the supported arrangements, plus 1. Each item is one cross-attention item of
`max_image_tiles * (patches + 1)` encoder rows whose span is its `<|image|>` token; which rows
each token sees (transformers' `cross_attention_mask`) is the model's (`cross_ranges`).
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.pixels import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    decoded_pixels,
    image_processor_section,
    normalize_frames,
    read_json,
    resize,
    scaled_mean_std,
    split_tiles,
)
from polymodal.processors.types import CROSS_ATTENTION, MultimodalItem, ProcessedPrompt


@lru_cache(maxsize=8)
def tile_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """transformers' `get_all_supported_aspect_ratios`: (a, b) with a * b <= max_tiles, in its
    order (the aspect ratio id is the index + 1; the canvas reads a pair as (rows, cols))."""
    sides = range(1, max_tiles + 1)
    return [(a, b) for a in sides for b in sides if a * b <= max_tiles]


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """transformers' `get_optimal_tiled_canvas`: the (height, width) canvas of tiles that needs
    the smallest upscale (else the largest downscale) to hold the image; ties: least area."""
    canvases = [(a * tile, b * tile) for a, b in tile_arrangements(max_tiles)]
    scales = [min(h / height, w / width) for h, w in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # first of the least area


def fit_to_canvas(height: int, width: int, canvas: tuple[int, int], tile: int) -> tuple[int, int]:
    """transformers' `get_image_size_fit_to_canvas`: the resized (height, width), aspect kept,
    each side clipped to [tile, canvas side]."""
    target_w = min(max(width, tile), canvas[1])
    target_h = min(max(height, tile), canvas[0])
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tiles_pixel_values(
    frames: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    tile: int,
    grid: tuple[int, int],
    max_tiles: int,
    size: tuple[int, int] | None = None,
    resample: int = 2,
) -> torch.Tensor:
    """Decoded uint8 `[1, C, H, W]` -> `[max_tiles, C, tile, tile]` (a `MultimodalItem.pixel_fn`):
    resized to `size` (`fit_to_canvas`; on CUDA staging's resize kernel, the CPU kernel's
    bits), zero-padded to the `grid` canvas, cut into tiles row-major, normalized, zero tiles
    after."""
    if size is not None:
        frames = resize(frames, size, resample)
    rows, cols = grid
    channels, height, width = frames.shape[1:]
    canvas = F.pad(frames, (0, cols * tile - width, 0, rows * tile - height))
    tiles = normalize_frames(split_tiles(canvas, rows, cols, tile), mean, std)
    out = tiles.new_zeros(max_tiles, channels, tile, tile)
    out[: rows * cols] = tiles
    return out.to(dtype)


def with_bos(prompt: str, bos: str, image_token: str) -> str:
    """transformers' `build_string_from_input`: BOS after the leading image tokens, unless the
    prompt has one."""
    if bos in prompt:
        return prompt
    rest, leading = prompt, 0
    while rest.startswith(image_token):
        rest, leading = rest[len(image_token) :], leading + 1
    return f"{image_token * leading}{bos}{rest}"


class MllamaProcessor(MediaProcessor):
    """Prompt + image processing for Llama 3.2 Vision checkpoints."""

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        size = section.get("size") or {"height": 560, "width": 560}
        self.tile = int(size["height"])
        self.max_tiles = int(section.get("max_image_tiles", 4))
        self.resample = int(section.get("resample", 2))
        self.mean, self.std = scaled_mean_std(
            section.get("image_mean", IMAGENET_STANDARD_MEAN),
            section.get("image_std", IMAGENET_STANDARD_STD),
            section.get("rescale_factor", 1 / 255),
        )
        config = (read_json(Path(model_dir) / "config.json") or {}) if model_dir else {}
        patch = (config.get("vision_config") or {}).get("patch_size", 14)
        self.rows_per_image = self.max_tiles * ((self.tile // patch) ** 2 + 1)
        self.placeholder = getattr(tokenizer, "image_token", None) or "<|image|>"
        self.embed_token_id = tokenizer.convert_tokens_to_ids(self.placeholder)

    def process(self, messages=None, prompt=None, images=(), videos=(), **options: Any):
        """As `MediaProcessor.process`; a raw prompt gets its BOS as transformers adds it."""
        bos = self.tokenizer.bos_token
        if isinstance(prompt, str) and bos:
            prompt = with_bos(prompt, bos, self.placeholder)
        return super().process(messages, prompt, images, videos, **options)

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        """The decoded image (uint8) with its canvas size and tile grid: resized, tiled and
        normalized at staging, on the model's device (`tiles_pixel_values`); the text keeps
        the one `<|image|>` token."""
        frames, pixels = decoded_pixels(image, pixels_key)  # [1, 3, H, W] uint8
        height, width = frames.shape[-2:]
        canvas = best_canvas(height, width, self.max_tiles, self.tile)
        size = fit_to_canvas(height, width, canvas, self.tile)
        grid = (canvas[0] // self.tile, canvas[1] // self.tile)
        aspect_ratio_id = tile_arrangements(self.max_tiles).index(grid) + 1
        knobs = [self.tile, self.max_tiles, self.resample, *self.mean.tolist(), *self.std.tolist()]
        key = {**pixels, "knobs": torch.tensor(knobs, dtype=torch.float64)}
        data = {
            "pixel_frames": frames,
            "pixel_mean": self.mean,
            "pixel_std": self.std,
            "aspect_ratio_id": torch.tensor(aspect_ratio_id),
            "num_tiles": torch.tensor(grid[0] * grid[1]),
        }
        pixel_fn = partial(tiles_pixel_values, tile=self.tile, grid=grid,
                           max_tiles=self.max_tiles, size=size, resample=self.resample)  # fmt: skip
        item = MultimodalItem(
            "image", data, -1, 1, content_hash("image", key), target=CROSS_ATTENTION,
            pixel_fn=pixel_fn, encoder_rows=self.rows_per_image,
        )  # fmt: skip
        return item, self.placeholder

    def finish(self, ids: list[int], items: list[MultimodalItem]) -> ProcessedPrompt:
        """Each item's span is its `<|image|>` token, in order."""
        positions = [i for i, token in enumerate(ids) if token == self.embed_token_id]
        if len(positions) != len(items):
            raise InvalidInputError(
                f"the prompt has {len(positions)} {self.placeholder!r} tokens for {len(items)} "
                "images: the text must not contain the image token itself"
            )
        for item, position in zip(items, positions):
            item.slot_start, item.num_slots = position, 1
        return ProcessedPrompt(list(ids), None, 0, items)
