"""Encoder registry: built-in lookups, custom registration, clear errors."""

import pytest
import torch
from torch import nn

from polymodal.encoders import ENCODERS, VisionEncoder, get_encoder_class, register_encoder
from polymodal.encoders.qwen2_5_vl import Qwen2_5VisionTower
from polymodal.encoders.qwen2_vl import Qwen2VisionTower
from polymodal.encoders.registry import encoder_class_for_config
from polymodal.llm_core.errors import UnsupportedModelError


class ToyEncoder(nn.Module):
    """Mean of each 2x2 block of patches through one linear layer."""

    spatial_merge_size = 2

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)

    @classmethod
    def from_config(cls, hf_vision_config, dtype=torch.float32, device="cpu", backend=None):
        return cls(hf_vision_config["in_dim"], hf_vision_config["hidden"]).to(dtype)

    def load_weights(self, named_tensors):
        self.load_state_dict(dict(named_tensors))

    def forward(self, pixel_values, grid_thw):
        return self.proj(pixel_values.view(-1, 4, pixel_values.shape[-1]).mean(1))


@pytest.fixture
def registry(monkeypatch):
    """Registry edits inside a test are undone after it."""
    monkeypatch.setattr("polymodal.encoders.registry.ENCODERS", dict(ENCODERS))


def test_builtin_architectures():
    assert get_encoder_class("Qwen2VLForConditionalGeneration") is Qwen2VisionTower
    assert get_encoder_class("Qwen2_5_VLForConditionalGeneration") is Qwen2_5VisionTower
    assert encoder_class_for_config({"model_type": "qwen2_5_vl"}) is Qwen2_5VisionTower
    assert isinstance(Qwen2VisionTower.from_config(_QWEN2_VL_CONFIG), VisionEncoder)


_QWEN2_VL_CONFIG = {"depth": 1, "embed_dim": 16, "hidden_size": 8, "num_heads": 2}


def test_register_custom_encoder(registry):
    register_encoder("ToyVLForConditionalGeneration", ToyEncoder)
    cls = encoder_class_for_config({"architectures": ["ToyVLForConditionalGeneration"]})
    assert cls is get_encoder_class("ToyVLForConditionalGeneration") is ToyEncoder
    encoder = cls.from_config({"in_dim": 6, "hidden": 3})
    out = encoder(torch.randn(8, 6), torch.tensor([[1, 2, 4]]))
    assert out.shape == (2, 3)


def test_register_overrides_builtin(registry):
    register_encoder("Qwen2VLForConditionalGeneration", ToyEncoder)
    assert get_encoder_class("Qwen2VLForConditionalGeneration") is ToyEncoder


def test_incomplete_encoder_is_rejected(registry):
    with pytest.raises(TypeError, match="lacks from_config, load_weights"):
        register_encoder("Broken", nn.Linear)


def test_unknown_architecture_names_itself():
    with pytest.raises(UnsupportedModelError, match="'NopeForConditionalGeneration'"):
        get_encoder_class("NopeForConditionalGeneration")
    with pytest.raises(UnsupportedModelError, match="NopeModel"):
        encoder_class_for_config({"architectures": ["NopeModel"], "model_type": "nope"})
