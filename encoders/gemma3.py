"""Gemma 3's image encoder: the SigLIP tower, then the multimodal projector (average-pool the
`(S/p) x (S/p)` patch grid down to `mm_tokens_per_image` tokens, Gemma RMSNorm, one matmul
into the decoder's width). Each crop of an image (pan-and-scan) is one tower image.

Names follow transformers': `vision_tower.*` (the SigLIP tower) and
`multi_modal_projector.{mm_input_projection_weight, mm_soft_emb_norm.weight}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.siglip import SiglipVisionTower
from polymodal.encoders.vision_layers import make_uninitialized
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.layers.norm import GemmaRMSNorm


class Gemma3Projector(nn.Module):
    """`[N, patches, vision_dim]` -> `[N, mm_tokens_per_image, text_dim]`."""

    def __init__(self, hf_config) -> None:
        super().__init__()
        vision, text = hf_config.vision_config, hf_config.get_text_config()
        self.mm_input_projection_weight = nn.Parameter(
            torch.empty(vision.hidden_size, text.hidden_size)
        )
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.patches_per_side = vision.image_size // vision.patch_size
        tokens_per_side = int(hf_config.mm_tokens_per_image**0.5)
        self.kernel = self.patches_per_side // tokens_per_side

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        count, _, dim = features.shape
        side = self.patches_per_side
        # [N, patches, dim] -> [N, dim, side, side] -> pooled [N, dim, t, t] -> [N, t*t, dim]
        grid = features.transpose(1, 2).reshape(count, dim, side, side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        normed = self.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).to(features.dtype)


class Gemma3VisionEncoder(nn.Module):
    """Images (and their pan-and-scan crops) -> `mm_tokens_per_image` embeddings each."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        backend = backend if backend is not None else TorchAttentionBackend()
        self.vision_tower = SiglipVisionTower(hf_config.vision_config, backend)
        self.multi_modal_projector = Gemma3Projector(hf_config)
        self.graphs = None  # EncoderGraphs of `embed_pixels` once the decoder's are captured

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `Gemma3Config`; weights come from the model's loader."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        from polymodal.encoders.vision_layers import load_checked

        load_checked(self, named_tensors)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[crops, C, S, S]` -> `[crops, mm_tokens_per_image, text_dim]` (what the CUDA graphs
        of `Gemma3ForConditionalGeneration.enable_cuda_graphs` replay)."""
        return self.multi_modal_projector(self.vision_tower(pixels))

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call for every crop of every item: `[crops * tokens, text_dim]` each."""
        views = [it.data["pixel_values"] for it in items]
        # [crops, C, S, S]; one item's as is (a cat would copy them, then the graph again)
        pixels = views[0] if len(views) == 1 else torch.cat(views)
        embeds = (self.graphs or self.embed_pixels)(pixels)
        crops = [it.data["pixel_values"].shape[0] for it in items]
        return [e.flatten(0, 1) for e in embeds.split(crops)]
