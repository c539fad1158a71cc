"""The LLaVA family's pixel recipes: decoded frames -> views -> pixel values, wherever they are.

The processors (`llava.py`, `llava_onevision.py`; `pixtral.py` and `gemma3.py` take the
single-view and crops recipes too) only plan: from the decoded image's size and
the checkpoint's settings they fix every size (`plan_view`, `plan_anyres`) and keep the decoded
uint8 frames. `view_pixel_values` / `anyres_pixel_values` then do the pixel work at staging, on
the model's device (a CPU model: on the host), with the ops of transformers' torchvision
processors run as they run by default, on the CPU:

- resize: `pixels.resize`, torch's antialiased uint8 kernel (on a GPU its bit-exact Triton
  port), so the views are the same bytes on either device;
- pad (zeros, or the mean colour to a square), center crop and the cut into tiles: copies;
- normalize: `pixels.normalize_frames` (float32 `(x - mean) / std`, elementwise and correctly
  rounded on either device), then the cast to the model's dtype.

On a 12 MP photo the host spent ~20 ms (LLaVA-NeXT) to ~80 ms (OneVision's 31 views) on the
resizes, padding and normalizing; the GPU needs well under a millisecond of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polymodal.processors.pixels import normalize_frames, resize, split_tiles


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


def pad_to_square(frames: torch.Tensor, colour: tuple[int, ...]) -> torch.Tensor:
    """LlavaImageProcessor's `pad_to_square`: the frames centred on a `colour` square."""
    height, width = frames.shape[-2:]
    if height == width:
        return frames
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    out = frames.new_empty((*frames.shape[:-2], side, side))
    fill = torch.tensor(colour, dtype=frames.dtype)
    if frames.is_cuda:  # pinned and asynchronous: a pageable copy would wait for the stream
        from polymodal.llm_core.host_copy import copy_to

        fill = copy_to(fill, frames.device)
    out[...] = fill.to(frames.device).view(-1, 1, 1)
    out[..., top : top + height, left : left + width] = frames
    return out


@dataclass(frozen=True)
class ViewPlan:
    """One view of an image: optionally squared with `square` (the mean colour), resized to
    `size`, optionally center-cropped to `crop` (LLaVA-1.5; OneVision's images of a
    several-image prompt)."""

    size: tuple[int, int]
    resample: int
    square: tuple[int, ...] | None = None
    crop: tuple[int, int] | None = None


@dataclass(frozen=True)
class AnyresPlan:
    """LLaVA-NeXT's anyres views of an image: the whole image squashed to `view`, then the
    image resized to `fitted` (aspect kept), zero-padded (centred) to `canvas` (the best
    pinpoint) and cut into `grid` (rows, cols) tiles of `tile` px. `recrop`: (size, crop) all
    views are resized and center-cropped to after that (only when tile, view and crop differ,
    as transformers does)."""

    view: tuple[int, int]
    fitted: tuple[int, int]
    canvas: tuple[int, int]
    grid: tuple[int, int]
    tile: int
    resample: int
    recrop: tuple[tuple[int, int], tuple[int, int]] | None = None

    @property
    def num_views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


def plan_anyres(
    size: tuple[int, int],
    pinpoints: list,
    tile: int,
    view: tuple[int, int],
    resample: int,
    shortest: int,
    crop: tuple[int, int],
) -> AnyresPlan:
    """The anyres plan of an image of `size` (h, w) (see `AnyresPlan`)."""
    canvas = select_best_resolution(size, pinpoints)
    recrop = None
    if (tile, tile) != view or crop != view:  # as transformers: a second resize + crop
        recrop = (shortest_edge_size((tile, tile), shortest), crop)
    grid = (canvas[0] // tile, canvas[1] // tile)
    return AnyresPlan(view, fit_size(size, canvas), canvas, grid, tile, resample, recrop)


@dataclass(frozen=True)
class CropsPlan:
    """The whole image and its `boxes` (top, left, height, width), each resized to `size`
    (Gemma 3's pan-and-scan crops)."""

    size: tuple[int, int]
    resample: int
    boxes: tuple[tuple[int, int, int, int], ...] = ()


def view_frames(frames: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
    """Decoded uint8 `[1, 3, H, W]` -> the view `[1, 3, h, w]`, where `frames` are."""
    if plan.square is not None:
        frames = pad_to_square(frames, plan.square)
    frames = resize(frames, plan.size, plan.resample)
    return frames if plan.crop is None else center_crop(frames, plan.crop)


def anyres_frames(frames: torch.Tensor, plan: AnyresPlan) -> torch.Tensor:
    """Decoded uint8 `[1, 3, H, W]` -> the base view and the tiles `[1 + rows * cols, 3, t, t]`,
    where `frames` are."""
    fitted = resize(frames, plan.fitted, plan.resample)
    # zero padding, centred (transformers' `_pad_for_patching`)
    pad_h, pad_w = plan.canvas[0] - plan.fitted[0], plan.canvas[1] - plan.fitted[1]
    padded = F.pad(fitted, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    tiles = split_tiles(padded, *plan.grid, plan.tile)  # [rows * cols, 3, t, t]
    views = torch.cat([resize(frames, plan.view, plan.resample), tiles])
    if plan.recrop is not None:
        size, crop = plan.recrop
        views = center_crop(resize(views, size, plan.resample), crop)
    return views


def crops_frames(frames: torch.Tensor, plan: CropsPlan) -> torch.Tensor:
    """Decoded uint8 `[1, 3, H, W]` -> `[1 + len(boxes), 3, h, w]`, where `frames` are."""
    views = [frames] + [frames[..., t : t + h, x : x + w] for t, x, h, w in plan.boxes]
    return torch.cat([resize(view, plan.size, plan.resample) for view in views])


def crops_pixel_values(
    frames: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    plan: CropsPlan,
) -> torch.Tensor:
    """Pixel values `[1 + len(boxes), 3, h, w]` in `dtype` (a `MultimodalItem.pixel_fn`)."""
    return normalize_frames(crops_frames(frames, plan), mean, std, dtype)


def view_pixel_values(
    frames: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    plan: ViewPlan,
) -> torch.Tensor:
    """Pixel values `[1, 3, h, w]` in `dtype` of one view (a `MultimodalItem.pixel_fn`)."""
    return normalize_frames(view_frames(frames, plan), mean, std, dtype)


def anyres_pixel_values(
    frames: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    plan: AnyresPlan,
) -> torch.Tensor:
    """Pixel values `[1 + rows * cols, 3, t, t]` in `dtype` of the anyres views (a
    `MultimodalItem.pixel_fn`)."""
    return normalize_frames(anyres_frames(frames, plan), mean, std, dtype)
