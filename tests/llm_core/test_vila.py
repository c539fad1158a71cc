"""Loading VILA / NVILA checkpoints as the hub lays them out, and the other forms they take:
the three folders with inline sub-configs (the tiny fixtures), sub-configs only in the folders,
one folder holding the whole model's state dict (`llm.*`, `vision_tower.vision_tower.*`,
`mm_projector.*`), a SigLIP tower saved by transformers 5 (no `vision_model.` level); missing
tensors and unsupported variants fail naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymodal.llm_core.config import load_config
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.models.vila import LlavaLlamaModel
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits, tiny_checkpoint

PROMPT = list(range(20, 44))


def _logits(path) -> torch.Tensor:
    engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    seen = record_logits(engine)
    engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.run_until_done()
    return torch.cat([s.cpu() for s in seen])


@pytest.fixture(scope="module")
def nvila(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "nvila")
    return path, _logits(path)


def _copy(path, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(path, out)
    return out


def test_hub_layout_keeps_the_tokenizer_in_llm(nvila):
    path, _ = nvila
    assert not (path / "tokenizer_config.json").exists()
    assert LlavaLlamaModel.tokenizer_dir(path) == path / "llm"
    assert {p.name for p in path.iterdir()} >= {"llm", "vision_tower", "mm_projector"}


def test_sub_configs_read_from_their_folders(nvila, tmp_path):
    path, expected = nvila
    out = _copy(path, tmp_path)
    config = json.loads((out / "config.json").read_text())
    for key in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
        config[key] = f"runs/train/model/{key.split('_cfg')[0]}"  # a name, as some saves have
    (out / "config.json").write_text(json.dumps(config))
    cfg = load_config(out)
    assert cfg.text_config.model_type == "qwen2" and cfg.hf_config.vision_config.image_size == 28
    torch.testing.assert_close(_logits(out), expected, rtol=0, atol=0)


def test_one_folder_with_the_whole_state_dict(nvila, tmp_path):
    """The model's own state-dict names in one file at the root (a single-folder save)."""
    path, expected = nvila
    out = tmp_path / "flat"
    out.mkdir()
    shutil.copy(path / "config.json", out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(path / "llm" / name, out)
    tensors = {"llm." + k: v for k, v in load_file(path / "llm" / "model.safetensors").items()}
    for k, v in load_file(path / "vision_tower" / "model.safetensors").items():
        tensors["vision_tower.vision_tower." + k] = v
    for k, v in load_file(path / "mm_projector" / "model.safetensors").items():
        tensors["mm_projector." + k] = v
    save_file(tensors, str(out / "model.safetensors"))
    assert LlavaLlamaModel.tokenizer_dir(out) == out
    torch.testing.assert_close(_logits(out), expected, rtol=0, atol=0)


def test_tower_saved_by_transformers_5(nvila, tmp_path):
    path, expected = nvila
    out = _copy(path, tmp_path)
    tower = out / "vision_tower" / "model.safetensors"
    tensors = load_file(tower)
    save_file({k.removeprefix("vision_model."): v for k, v in tensors.items()}, str(tower))
    torch.testing.assert_close(_logits(out), expected, rtol=0, atol=0)


def test_missing_tensor_is_named(nvila, tmp_path):
    out = _copy(nvila[0], tmp_path)
    projector = out / "mm_projector" / "model.safetensors"
    tensors = load_file(projector)
    tensors.pop("layers.2.weight")
    save_file(tensors, str(projector))
    with pytest.raises(ModelLoadError, match=r"vision\.mm_projector\.layers\.2\.weight"):
        Engine(str(out), dtype="float32", device="cpu", num_kv_blocks=64)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"s2": True, "dynamic_s2": False}, "fixed S2"),
        ({"mm_vision_select_feature": "patch"}, "cls_patch"),
        ({"mm_projector_cfg": {"mm_projector_type": "spatial_pool"}}, "spatial_pool"),
        ({"vision_tower_cfg": {"model_type": "intern_vit_6b"}}, "intern_vit_6b"),
    ],
)
def test_unsupported_variants_fail_clearly(nvila, tmp_path, change, message):
    from polymodal import LLM

    out = _copy(nvila[0], tmp_path)
    config = json.loads((out / "config.json").read_text())
    config.update(change)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        LLM(str(out), dtype="float32", device="cpu", num_kv_blocks=64)
