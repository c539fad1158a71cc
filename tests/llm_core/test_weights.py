"""Model-owned weight loading: the default helper driven by each model's declared tables
(packing, prefix remaps, ignored tensors, tied parameters), strict about everything else."""

import pytest
import torch
from torch import nn

from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.models.base import ModelBase


class Toy(ModelBase):
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k")}
    weight_name_remap = [("model.language_model.", "model.")]
    ignored_weights = (r"^lm_head\.", r"\.mtp\.")

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(5, 4)
        self.model.qkv_proj = PackedLinear(4, {"q": 4, "k": 2}, bias=False)
        self.head = Linear(4, 5, bias=False)
        self.head.weight = self.model.embed.weight
        self.tied_parameters = {"head.weight": "model.embed.weight"}


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "model.language_model.embed.weight": torch.randn(5, 4, generator=gen),
        "model.q_proj.weight": torch.randn(4, 4, generator=gen),
        "model.k_proj.weight": torch.randn(2, 4, generator=gen),
        "lm_head.weight": torch.randn(5, 4, generator=gen),  # ignored: not this model's
        "model.layers.3.mtp.proj.weight": torch.randn(3, 3, generator=gen),  # ignored
        "head.weight": torch.randn(5, 4, generator=gen),  # tied: comes from the embedding
    }


def test_declared_tables_drive_the_default_loader():
    model, tensors = Toy(), _tensors()
    model.load_weights(tensors.items())
    assert torch.equal(model.model.embed.weight, tensors["model.language_model.embed.weight"])
    qkv = model.model.qkv_proj.weight
    assert torch.equal(qkv[:4], tensors["model.q_proj.weight"])
    assert torch.equal(qkv[4:], tensors["model.k_proj.weight"])
    assert model.head.weight.data_ptr() == model.model.embed.weight.data_ptr()


def test_unexpected_missing_and_misshaped_tensors_are_named():
    tensors = _tensors()
    with pytest.raises(ModelLoadError, match=r"unexpected tensors.*model\.extra\.weight"):
        Toy().load_weights([*tensors.items(), ("model.extra.weight", torch.zeros(1))])
    without_k = {k: v for k, v in tensors.items() if k != "model.k_proj.weight"}
    with pytest.raises(ModelLoadError, match=r"missing from the checkpoint.*qkv_proj\.weight"):
        Toy().load_weights(without_k.items())
    tensors["model.q_proj.weight"] = torch.zeros(3, 4)
    with pytest.raises(ModelLoadError, match=r"'model\.q_proj\.weight'.*does not fit"):
        Toy().load_weights(tensors.items())


def test_a_model_may_override_its_loading():
    class Renamed(Toy):
        def load_weights(self, named_tensors, source="checkpoint"):
            renamed = ((n.replace("old_embed", "embed"), t) for n, t in named_tensors)
            super().load_weights(renamed, source)

    tensors = _tensors()
    tensors["model.old_embed.weight"] = tensors.pop("model.language_model.embed.weight")
    model = Renamed()
    model.load_weights(tensors.items())
    assert torch.equal(model.model.embed.weight, tensors["model.old_embed.weight"])
