"""Phi-4-multimodal from the hub's own layout (`Phi4MMForCausalLM`, model_type `phi4mm`): the
transformers-layout tiny checkpoint rewritten by the inverse renames and config conversion
gives the same tokens and the same logits (bitwise) for text, image, audio and both; the
config.json converter on the published config; clear errors for what is not implemented."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal import LLM, SamplingParams
from polymodal.llm_core.config import load_config
from polymodal.llm_core.errors import ModelLoadError, UnsupportedModelError
from polymodal.llm_core.models.phi4mm_hub import hub_config_dict, hub_name
from polymodal.llm_core.models.phi4mm_tiny import to_hub_name, write_hub_layout
from tests.helpers import record_logits, tiny_checkpoint
from tests.sdk.vl_reference import random_image

STEPS = 5
RNG = np.random.default_rng(1)
CLIP = (RNG.standard_normal(12000) * 0.1).astype(np.float32)
CASES = {  # (images, audio clips): each case picks a different adapter (none, vision, speech)
    "text": ([], []),
    "image": ([random_image(90, 60, 3)], []),
    "audio": ([], [CLIP]),
    "image_audio": ([random_image(40, 70, 5)], [CLIP]),
}
SHIPPED = "sdk/configs/phi_4_multimodal"


def _messages(images, clips, text="Describe."):
    parts = [{"type": "image", "image": im} for im in images]
    parts += [{"type": "audio", "audio": (c, 16000)} for c in clips]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    hf_dir = tiny_checkpoint(tmp_path_factory, "phi4mm")
    hub_dir = write_hub_layout(hf_dir, tmp_path_factory.mktemp("phi4mm_hub") / "ckpt")
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=512)
    return LLM(str(hf_dir), **kw), LLM(str(hub_dir), **kw), hf_dir, hub_dir


def _run(llm, prompt):
    seen = record_logits(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    return out.outputs[0].token_ids, [row[0].clone() for row in seen]


def test_hub_layout_has_the_hub_names(layouts):
    from safetensors.torch import load_file

    _, hub_llm, _, hub_dir = layouts
    names = set(load_file(str(hub_dir / "model.safetensors")))
    assert "model.layers.0.self_attn.qkv_proj.base_layer.weight" in names
    assert "model.layers.1.mlp.down_proj.lora_B.speech.weight" in names
    assert "model.embed_tokens_extend.image_embed.glb_GN" in names
    assert "model.embed_tokens_extend.audio_embed.audio_projection.vision.2.weight" in names
    assert any(".self_attn.linear_out." in n for n in names)
    assert not (hub_dir / "vision-lora").exists()
    cfg = load_config(hub_dir)
    assert cfg.architecture == "Phi4MMForCausalLM"
    assert type(hub_llm.engine.runner.model).__name__ == "Phi4MMForCausalLM"


def test_renames_round_trip(layouts):
    """Every transformers name survives hub -> transformers (SigLIP's q_proj untouched)."""
    from safetensors.torch import load_file

    names = load_file(str(layouts[2] / "model.safetensors"))
    for name in names:
        assert hub_name(to_hub_name(name)) == name


@pytest.mark.parametrize("case", list(CASES))
def test_hub_layout_matches_transformers_layout(layouts, case):
    hf_llm, hub_llm = layouts[:2]
    prompt = {"messages": _messages(*CASES[case])}
    ref_tokens, ref_logits = _run(hf_llm, prompt)
    tokens, logits = _run(hub_llm, prompt)
    assert tokens == ref_tokens
    assert len(logits) == STEPS
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.equal(a, b), f"{case} step {step}: {(a - b).abs().max():.2e}"


def test_hub_adapters_come_from_the_checkpoint(layouts):
    hub_llm, hub_dir = layouts[1], layouts[3]
    found = hub_llm.engine.runner.model.builtin_adapters()
    config = json.loads((hub_dir / "config.json").read_text())
    assert sorted(found) == ["speech", "vision"]
    for name, (peft, tensors) in found.items():
        assert peft["r"] == config[f"{name}_lora"]["r"]
        assert "model.layers.0.self_attn.qkv_proj.lora_A.weight" in tensors


def test_published_config_converts():
    """The shipped copy of the hub's config.json: the published sizes, LongRoPE, LoRA ranks."""
    cfg = load_config(SHIPPED)
    hf = cfg.hf_config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers) == ("Phi4MMForCausalLM", 3072, 32)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rotary_dim) == (24, 8, 96)
    assert hf.rope_parameters["rope_type"] == "longrope" and cfg.tie_word_embeddings
    vc, ac = hf.vision_config, hf.audio_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.crop_size) == (1152, 27, 448)
    assert vc.feature_layer == -2
    assert (ac.hidden_size, ac.num_blocks, ac.intermediate_size, ac.nemo_conv_channels) == (
        1024, 24, 1536, 1024,
    )  # fmt: skip
    assert ac.bias_max_distance == 500 and ac.depthwise_separable_out_channel == 1024
    assert (hf.vision_lora["r"], hf.speech_lora["r"]) == (256, 320)


def test_unimplemented_variants_are_named(tmp_path):
    raw = json.loads((Path(SHIPPED) / "config.json").read_text())
    raw["embd_layer"]["image_embd_layer"]["hd_transform_order"] = "glb_sub"
    with pytest.raises(UnsupportedModelError, match="hd_transform_order"):
        hub_config_dict(raw)
    raw = json.loads((Path(SHIPPED) / "config.json").read_text())
    raw["img_processor"] = {"name": "clip_vision_model"}
    with pytest.raises(UnsupportedModelError, match="SigLIP"):
        hub_config_dict(raw)


def test_lora_tensors_without_a_rank_are_an_error(tmp_path, layouts):
    hub_dir = layouts[3]
    bad = tmp_path / "bad"
    shutil.copytree(hub_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["speech_lora"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="speech_lora"):
        LLM(str(bad), dtype="float32", device="cpu", num_kv_blocks=64)
