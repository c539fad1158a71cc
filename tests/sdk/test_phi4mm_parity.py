"""Phi-4-multimodal end to end (processor + SigLIP HD + conformer + decoder + the modality
LoRA picked per request) vs transformers' `Phi4MultimodalForCausalLM` with the same adapter
merged into its weights, fp32 on the CPU: text, image, audio, image + audio, a mixed batch of
them in one engine run, chunked prefill (the hub's own layout: test_phi4mm_hub.py)."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from polymodal import LLM
from polymodal.llm_core.models.phi4mm import Phi4MMForCausalLM
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_batch_matches,
    assert_single_matches,
    hf_greedy,
    random_image,
)

STEPS = 5
RNG = np.random.default_rng(0)
CLIP = (RNG.standard_normal(16000) * 0.1).astype(np.float32)
CLIP2 = (RNG.standard_normal(9000) * 0.1).astype(np.float32)
CASES = {  # (images, audio clips)
    "text": ([], []),
    "image": ([random_image(100, 70, 1)], []),
    "audio": ([], [CLIP]),
    "image_audio": ([random_image(50, 60, 2)], [CLIP2]),
}


def _messages(images, clips, text="Describe."):
    parts = [{"type": "image", "image": im} for im in images]
    parts += [{"type": "audio", "audio": (c, 16000)} for c in clips]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _merged(hf, path, adapter):
    """A copy of `hf` with the PEFT adapter folder `adapter` merged into its weights."""
    if adapter is None:
        return hf
    merged = copy.deepcopy(hf)
    folder = path / f"{adapter}-lora"
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            merged.get_submodule(module).weight += scale * b @ a
    return merged


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "phi4mm")
    hf = tf.Phi4MultimodalForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    merged = {name: _merged(hf, path, name) for name in (None, "vision", "speech")}
    return path, merged, processor


@pytest.fixture(scope="module")
def llm(models):
    return LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=512)


def _reference(models, case):
    _, merged, processor = models
    images, clips = CASES[case]
    msgs = _messages(images, clips)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": p["type"]} if p["type"] != "text" else p
                                      for p in msgs[0]["content"]]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    inputs = processor(text=[text], images=images or None, audio=clips or None,
                       return_tensors="pt")  # fmt: skip
    kinds = ["image"] * len(images) + ["audio"] * len(clips)
    adapter = Phi4MMForCausalLM.modality_adapter([type("Item", (), {"modality": m}) for m in kinds])
    return hf_greedy(merged[adapter], dict(inputs), STEPS)


def test_processor_matches_transformers(models, llm):
    """Token ids (expanded slots), pixel values, patch masks, features: as transformers'."""
    _, _, processor = models
    images, clips = [random_image(100, 70, 1), random_image(30, 200, 4)], [CLIP]
    text = "<|user|><|image_1|><|audio_1|>Look<|image_2|><|end|><|assistant|>"
    ours = llm.processor.process(prompt=text, images=images, audios=[(c, 16000) for c in clips])
    hf_text = text.replace("<|image_1|>", "<|image|>").replace("<|image_2|>", "<|image|>")
    ref = processor(text=[hf_text.replace("<|audio_1|>", "<|audio|>")], images=images,
                    audio=clips, return_tensors="pt")  # fmt: skip
    assert ours.token_ids == ref["input_ids"][0].tolist()
    image_items = [it for it in ours.mm_items if it.modality == "image"]
    for i, item in enumerate(image_items):
        crops = item.data["pixel_values"].shape[0]
        diff = (item.data["pixel_values"] - ref["image_pixel_values"][i, :crops]).abs().max()
        assert diff <= 1e-5
        assert torch.equal(item.data["patch_mask"], ref["image_attention_mask"][i, :crops].bool())
        assert item.data["image_size"].tolist() == ref["image_sizes"][i].tolist()
    audio = [it for it in ours.mm_items if it.modality == "audio"][0]
    assert (audio.data["audio_features"] - ref["audio_input_features"][0]).abs().max() <= 1e-4
    assert audio.num_slots == int(ref["audio_embed_sizes"][0])


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(models, llm, case):
    tokens, logits = _reference(models, case)
    images, clips = CASES[case]
    assert_single_matches(llm, {"messages": _messages(images, clips)}, tokens, logits, STEPS, case)


def test_mixed_batch_matches_transformers(models, llm):
    """Text, image, audio and image + audio requests (three adapters) in the same steps."""
    cases = list(CASES) * 2
    refs = [_reference(models, case) for case in cases]
    prompts = [{"messages": _messages(*CASES[case])} for case in cases]
    assert_batch_matches(llm, prompts, refs, STEPS)


@pytest.mark.parametrize("budget", [37, 200])
def test_chunked_prefill_matches(models, budget):
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=512,
              max_num_batched_tokens=budget)  # fmt: skip
    for case in ("image_audio", "audio"):
        tokens, logits = _reference(models, case)
        prompt = {"messages": _messages(*CASES[case])}
        assert_single_matches(llm, prompt, tokens, logits, STEPS, f"{case}@{budget}")
