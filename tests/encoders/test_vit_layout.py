"""The residual stream of the SigLIP towers (Gemma 3, LLaVA-OneVision, Phi-4-MM) is row-major:
a conv's channel-major output summed with the position embeddings kept its layout, so every
residual add of the tower ran strided and every LayerNorm copied its input first (~4 ms of
Gemma 3's 17 ms tower on an H200)."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import patch

import torch
from torch import nn

from polymodal.encoders.siglip import SiglipVisionTower
from polymodal.llm_core.attention.torch_ref import TorchAttentionBackend

CONFIG = SimpleNamespace(
    patch_size=4, image_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=48, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)  # fmt: skip


def _norm_inputs(tower: nn.Module, run) -> list[torch.Tensor]:
    """Every stream tensor entering a LayerNorm of the tower (the ViT layers' adds run inside
    the norms: `vit.add_layer_norm(norm, x, delta)`)."""
    from polymodal.encoders import vit

    seen, real = [], vit.add_layer_norm

    def spy(norm, x, delta=None, **kwargs):
        seen.extend(t for t in (x, delta) if t is not None)
        return real(norm, x, delta, **kwargs)

    with patch.object(vit, "add_layer_norm", spy), torch.inference_mode():
        run()
    return seen


def test_siglip_norms_see_row_major_inputs():
    tower = SiglipVisionTower(CONFIG, TorchAttentionBackend())
    for count in (1, 3):
        pixels = torch.randn(count, 3, 16, 16)
        inputs = _norm_inputs(tower, lambda pixels=pixels: tower(pixels))
        assert len(inputs) >= 2 * CONFIG.num_hidden_layers + 1
        assert all(x.is_contiguous() for x in inputs), [x.stride() for x in inputs]


def test_phi4mm_tower_norms_see_row_major_inputs():
    from polymodal.encoders.phi4mm import Phi4MMVisionTower

    tower = Phi4MMVisionTower(CONFIG, TorchAttentionBackend())
    for crops in (1, 2):
        pixels, mask = torch.randn(crops, 3, 16, 16), torch.ones(crops, 4, 4, dtype=torch.bool)
        inputs = _norm_inputs(tower, lambda p=pixels, m=mask: tower(p, m, -1))
        assert len(inputs) >= 2 * CONFIG.num_hidden_layers
        assert all(x.is_contiguous() for x in inputs), [x.stride() for x in inputs]
