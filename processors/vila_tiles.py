"""VILA's image views: the tiles of NVILA's dynamic S2 and NVILA-Lite's `dynamic` mode, and
the single square view otherwise. All resizes are PIL's bicubic `Image.resize`, as the public
code (`llava/mm_utils.py`) and the SigLIP image processor it ran with do.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """A few threads for per-frame resizes (PIL releases the GIL while it resamples)."""
    global _POOL
    if _POOL is None:
        workers = min(8, os.cpu_count() or 1)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vila-views")
    return _POOL


def tile_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate (cols, rows) grids with `min_num <= cols * rows <= max_num`, ordered by tile
    count; among equal counts the order is that of Python's set iteration, as in the public
    code (it decides ties in `closest_grid`)."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, size: int, grids: list[tuple[int, int]]):
    """The (cols, rows) grid whose aspect ratio is nearest the image's; on a tie the later
    grid wins when the image's area exceeds half of that grid's pixels."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def cut(image: Image.Image, cols: int, rows: int, size: int) -> list[Image.Image]:
    """`image` resized to `cols x rows` tiles of `size` px, cut row-major."""
    resized = image.resize((cols * size, rows * size), Image.BICUBIC)
    boxes = [
        (c * size, r * size, (c + 1) * size, (r + 1) * size)
        for r in range(rows)
        for c in range(cols)
    ]
    return [resized.crop(box) for box in boxes]


def s2_tiles(image: Image.Image, scales: list[int], max_num: int, size: int):
    """NVILA's dynamic S2 views: a `k x k` grid for each scale but the last (k = scale /
    scales[0]), then the last scale's grid of at least `(scales[-1] / scales[0])^2` tiles
    fitted to the image's aspect ratio. Returns (tiles, (rows, cols) of the last grid)."""
    tiles: list[Image.Image] = []
    for scale in scales[:-1]:
        k = scale // scales[0]
        tiles += cut(image, k, k, size)
    min_num = (scales[-1] // scales[0]) ** 2
    cols, rows = closest_grid(*image.size, size, tile_grids(min_num, max_num))
    return tiles + cut(image, cols, rows, size), (rows, cols)


def dynamic_tiles(image: Image.Image, min_num: int, max_num: int, size: int):
    """NVILA-Lite's `dynamic` views: the aspect-fitted grid of tiles, plus the whole image
    squashed to one tile when the grid has more than one."""
    cols, rows = closest_grid(*image.size, size, tile_grids(min_num, max_num))
    tiles = cut(image, cols, rows, size)
    if len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    return tiles


def square_view(image: Image.Image, size: int, pad_colour=None) -> Image.Image:
    """The single view: optionally padded to a square on `pad_colour` (VILA's `pad` mode,
    centred), then resized to `size x size`."""
    if pad_colour is not None and image.width != image.height:
        side = max(image.size)
        canvas = Image.new(image.mode, (side, side), pad_colour)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image.resize((size, size), Image.BICUBIC)


def square_views(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """HWC uint8 frames -> their square views `[N, 3, S, S]`, resized on a few threads."""

    def view(frame: np.ndarray) -> np.ndarray:
        return np.asarray(square_view(Image.fromarray(frame), size))

    arrays = list(_pool().map(view, frames)) if len(frames) > 1 else [view(f) for f in frames]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def to_frames(views: list[Image.Image]) -> torch.Tensor:
    """PIL views of one size -> uint8 `[N, 3, S, S]`."""
    return torch.from_numpy(np.stack([np.asarray(v) for v in views])).permute(0, 3, 1, 2)
