"""VILA's multimodal projectors (`mm_projector/`: `MultimodalProjector`, config `v2l_projector`)
and NVILA's token-compression maths shared by its image and video paths.

A projector maps one view's tower features `[views, side * side, dim]` (row-major patches) to
decoder embeddings `[views, tokens, hidden]`. The `mlp_downsample*` kinds first fold each
`k x k` block of neighbouring features into one (zero-padding the grid's last rows / columns up
to a multiple of k): the block's features are concatenated row by row, so a token's input is
`[f(2i, 2j), f(2i, 2j+1), f(2i+1, 2j), f(2i+1, 2j+1)]` for k = 2. Parameter names are the
checkpoint's (`layers.<index>.weight`: the index counts the parameter-free blocks too).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.errors import ModelLoadError


class SpaceToChannel(nn.Module):
    """`[B, side^2, C]` -> `[B, ceil(side / k)^2, k * k * C]` (VILA's `DownSample*Block`)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        side, k = math.isqrt(count), self.k
        grid = x.view(batch, side, side, dim)
        pad = -side % k  # zero rows / columns appended at the end
        if pad:
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        blocks = (side + pad) // k
        # [B, rows, k, cols, k, C] -> [B, rows, cols, k (row), k (col), C]
        grid = grid.view(batch, blocks, k, blocks, k, dim).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(batch, blocks * blocks, k * k * dim)


def _normed_chain(widths: list[int]) -> list[nn.Module]:
    """LayerNorm -> Linear -> GELU for each step through `widths`."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.LayerNorm(a), nn.Linear(a, b), nn.GELU()]
    return layers


# the folds' LayerNorm -> Linear -> GELU chains, down to the decoder width (`hidden` last)
_FOLDED = {
    "mlp_downsample": (2, lambda m: [4 * m]),
    "mlp_downsample_2x2_fix": (2, lambda m: [4 * m]),
    "mlp_downsample_3x3_fix": (3, lambda m: [9 * m, 3 * m]),
    "mlp_downsample_3x3_s2": (3, lambda m: [9 * m, 3 * m, m, m // 3]),
    "mlp_downsample_3x3_s2_new": (3, lambda m: [9 * m, 4 * m, 2 * m, m, m // 3]),
}


def projector_layers(kind: str, mm_hidden: int, hidden: int) -> tuple[nn.Module, int]:
    """(the `layers` module of projector `kind`, its k x k downsampling factor). GELU is the
    exact (erf) one, as `nn.GELU()`."""
    if kind == "identity":
        return nn.Identity(), 1
    if kind == "linear":
        return nn.Linear(mm_hidden, hidden), 1
    if kind in _FOLDED:
        k, widths = _FOLDED[kind]
        chain = _normed_chain([*widths(mm_hidden), hidden])
        return nn.Sequential(SpaceToChannel(k), *chain, nn.Linear(hidden, hidden)), k
    found = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if found:
        layers: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(int(found.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*layers), 1
    raise ModelLoadError(
        f"mm_projector_type {kind!r} is not supported; known: identity, linear, "
        f"mlp<N>x_gelu, {', '.join(_FOLDED)}"
    )


class VilaProjector(nn.Module):
    """`[views, side^2, mm_hidden]` -> `[views, tokens, hidden]` (`layers` as the checkpoint)."""

    def __init__(self, kind: str, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        self.layers, self.downsample = projector_layers(kind, mm_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def tokens_per_side(side: int, downsample: int) -> int:
    """Tokens per side of one view after the projector."""
    return -(-side // downsample)


def temporal_spatial_pool(frames: torch.Tensor, pool: tuple[int, int, int]) -> torch.Tensor:
    """NVILA's TSP compression: `[T, n * n, C]` -> `[T / pt, (n / ph) * (n / pw), C]`, means over
    groups of `pt` consecutive frames, then `ph` rows, then `pw` columns (in that order)."""
    count, tokens, dim = frames.shape
    side = math.isqrt(tokens)
    x = frames.view(count, side, side, dim)
    for axis, size in enumerate(pool):
        shape = list(x.shape)
        x = x.view(*shape[:axis], shape[axis] // size, size, *shape[axis + 1 :]).mean(axis + 1)
    return x.flatten(1, 2)
