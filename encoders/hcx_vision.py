"""HyperCLOVA X SEED Vision image encoder (`HCXVisionForCausalLM`): the SigLIP tower read at
`use_nth_layer`, the C-Abstractor (`hcx_abstractor.py`) per grid, and the anyres packing.

What the processor hands over per image (`processors/hcx_vision.py` counts the tokens):
`pixel_values` `[1 + tiles, 3, S, S]`, the global view first (the image padded to a square)
and then the best grid's tiles row-major, and `tile_layout` (rows, cols, top, height, left,
width): the tile grid and the crop of the `(rows * q) x (cols * q)` query map that holds the
image (q = sqrt of `num_queries_vis_abstractor_image`). Each grid becomes q * q queries; the
tiles' queries are laid back into one map, which with `unpad` is cropped to the image and
given an `image_newline` column, and the global view's queries come first (the published
`anyres_postprocessing`). Without anyres an image is one grid: q * q queries.

Names follow the checkpoint's (`vision_model.*` as SigLIP's, `mm_projector.*`, `image_newline`);
the model's remap table puts them under `vision_tower.`, `mm_projector.`, `image_newline`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polymodal.encoders.hcx_abstractor import CAbstractor
from polymodal.encoders.siglip import SiglipVisionTower
from polymodal.encoders.vision_layers import load_checked, make_uninitialized
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.errors import ModelLoadError


def check_config(hf_config) -> None:
    """Refuse, naming the field, what the published code does that is not served here."""
    vision = hf_config.vision_config
    if getattr(vision, "model_type", None) != "siglip_vision_model":
        raise ModelLoadError(
            f"HyperCLOVA X SEED Vision with a {vision.model_type!r} vision tower is not "
            "supported (SigLIP only)"
        )
    kind = getattr(hf_config, "mm_projector_type", None)
    if kind != "cabstractor":
        raise ModelLoadError(
            f"HyperCLOVA X SEED Vision mm_projector_type={kind!r} is not supported "
            "('cabstractor' only)"
        )
    if not hf_config.anyres and hf_config.unpad:
        raise ModelLoadError(
            "HyperCLOVA X SEED Vision with unpad but not anyres: the published model adds a "
            "newline its processor does not count; not supported"
        )


class HCXVisionEncoder(nn.Module):
    """Images of a HyperCLOVA X SEED Vision checkpoint -> decoder embeddings per item."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        check_config(hf_config)
        backend = backend if backend is not None else TorchAttentionBackend()
        vision = hf_config.vision_config
        hidden = hf_config.get_text_config().hidden_size
        self.layer = int(hf_config.use_nth_layer)
        self.num_queries = int(hf_config.num_queries_vis_abstractor_image)
        self.side = math.isqrt(self.num_queries)  # queries per grid side
        self.unpad = bool(hf_config.unpad)
        self.vision_tower = SiglipVisionTower(vision, backend)
        self.mm_projector = CAbstractor(
            (vision.image_size // vision.patch_size) ** 2,
            vision.hidden_size,
            vision.hidden_size,
            hidden,
            pos_emb=bool(getattr(hf_config, "proj_pos_emb", True)),
            prenorm=bool(getattr(hf_config, "proj_prenorm", False)),
        )
        self.image_newline = nn.Parameter(torch.empty(hidden)) if hf_config.anyres else None

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `HCXVisionConfig`; weights come from the model's loader."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call and one abstractor call for every grid of every item."""
        views = [it.data["pixel_values"] for it in items]  # [grids, 3, S, S] each
        features = self.vision_tower(torch.cat(views), self.layer)  # [N, side^2, D]
        queries = self.mm_projector(features, self.num_queries)  # [N, q * q, hidden]
        grids = queries.split([v.shape[0] for v in views])  # [grids, q * q, hidden] each
        return [self.pack(g, it.data.get("tile_layout")) for g, it in zip(grids, items)]

    def pack(self, grids: torch.Tensor, layout: torch.Tensor | None) -> torch.Tensor:
        """`[1 + tiles, q * q, hidden]` -> the image's rows: the global view's queries, then the
        tiles' map in raster order (cropped, a newline ending each row, with `unpad`)."""
        if layout is None:  # no anyres: one grid
            return grids[0]
        base, tiles = grids[0], grids[1:]
        rows, cols, top, height, left, width = layout.tolist()
        q, dim = self.side, grids.shape[-1]
        # [rows, cols, q, q, dim] -> [rows * q, cols * q, dim]
        grid = tiles.view(rows, cols, q, q, dim).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * q, cols * q, dim)
        if not self.unpad:
            return torch.cat([base, grid.flatten(0, 1)])
        grid = grid[top : top + height, left : left + width]
        newline = self.image_newline.to(grid)[None, None].expand(height, 1, dim)
        return torch.cat([base, torch.cat([grid, newline], dim=1).flatten(0, 1)])
