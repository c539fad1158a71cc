"""Encoder weight loading: checked names and shapes, both checkpoint namings."""

import pytest
import torch

from polymodal.encoders import get_encoder_class, load_encoder, vision_tensors
from polymodal.encoders.loading import read_config, read_vision_tensors
from polymodal.llm_core.errors import ModelLoadError


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def arch(request):
    return request.param


def _fresh_tower(checkpoint):
    config = read_config(checkpoint)
    return get_encoder_class(config["architectures"][0]).from_config(config["vision_config"])


def test_missing_tensor_is_named(arch, vl_checkpoint):
    tensors = read_vision_tensors(vl_checkpoint(arch))
    del tensors["blocks.1.attn.qkv.weight"]
    with pytest.raises(ModelLoadError, match=r"missing tensors: blocks\.1\.attn\.qkv\.weight"):
        _fresh_tower(vl_checkpoint(arch)).load_weights(tensors)


def test_mis_shaped_tensor_is_named(arch, vl_checkpoint):
    tensors = read_vision_tensors(vl_checkpoint(arch))
    tensors["merger.mlp.0.weight"] = tensors["merger.mlp.0.weight"][:, :-1]
    with pytest.raises(ModelLoadError, match=r"mis-shaped tensors: merger\.mlp\.0\.weight"):
        _fresh_tower(vl_checkpoint(arch)).load_weights(tensors)


def test_unexpected_tensor_is_named(arch, vl_checkpoint):
    tensors = read_vision_tensors(vl_checkpoint(arch))
    tensors["blocks.0.attn.q_norm.weight"] = torch.ones(4)
    with pytest.raises(ModelLoadError, match=r"unexpected tensors: blocks\.0\.attn\.q_norm"):
        _fresh_tower(vl_checkpoint(arch)).load_weights(tensors)


def test_transformers_v5_names_load_the_same(arch, vl_checkpoint):
    """`model.visual.*` (v5) and `visual.*` (v4 checkpoints) give identical weights."""
    tensors = read_vision_tensors(vl_checkpoint(arch))
    stream = [("model.visual." + k, v) for k, v in tensors.items()]
    stream.append(("model.language_model.embed_tokens.weight", torch.zeros(2, 2)))
    tower = _fresh_tower(vl_checkpoint(arch))
    tower.load_weights(vision_tensors(stream))
    reference = load_encoder(vl_checkpoint(arch))
    for name, param in reference.state_dict().items():
        assert torch.equal(tower.state_dict()[name], param), name


def test_checkpoint_without_vision_config(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelLoadError, match="no vision_config"):
        load_encoder(tmp_path)
