"""VL models served as embedding models (`runner="pooling"`: GME / DSE on Qwen2-VL, E5-V on
LLaVA-NeXT, the LLaVA family, Gemma 3): prompts with images and text, last-token pooling +
normalization; vectors equal transformers' model (tower + decoder) on the HF processor's inputs
within 1e-4, batched with text-only prompts, chunked across steps, and through `LLM.embed`'s
chat messages."""

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from polymodal import LLM
from tests.helpers import tiny_checkpoint

MARK = "<|vision_start|><|image_pad|><|vision_end|>"
TOL = 1e-4


def _image(seed, w=84, h=56):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _reference(path, text: str, images: list) -> torch.Tensor:
    """transformers: the processor's ids and pixels through the model (no LM head); the last
    token's final hidden state, L2-normalized."""
    processor = tf.AutoProcessor.from_pretrained(path)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        hidden = hf.model(**inputs).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_image_and_text_prompts_equal_transformers(tmp_path_factory, arch):
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    cases = [
        (MARK + "What is in the image?", [_image(1)]),
        ("A photo: " + MARK + MARK + " two of them", [_image(2, 56, 84), _image(3)]),
        ("plain text, no image", []),
    ]
    prompts = [{"prompt": t, "multi_modal_data": {"image": i}} if i else t for t, i in cases]
    for budget in (None, 16):  # whole prompts, and chunks of 16 tokens across steps
        llm = LLM(path, device="cpu", dtype="float32", runner="pooling", num_kv_blocks=128,
                  max_num_batched_tokens=budget)  # fmt: skip
        outs = llm.embed(prompts)
        for out, (text, images) in zip(outs, cases):
            want = _reference(path, text, images)
            assert (torch.tensor(out.outputs.embedding) - want).abs().max() <= TOL
        assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_usable_blocks


@pytest.mark.parametrize(
    "arch", ["llava_next", "llava_onevision", "pixtral", "mistral3", "gemma3_vl"]
)
def test_other_families_equal_transformers(tmp_path_factory, arch):
    """The family's own chat template and image tokens (Gemma 3: its image attends to itself
    both ways, as in generation)."""
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    processor = tf.AutoProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=False)  # fmt: skip
    image = _image(6)
    llm = LLM(path, device="cpu", dtype="float32", runner="pooling", num_kv_blocks=256)
    (out,) = llm.embed([{"prompt": text, "multi_modal_data": {"image": image}}])
    want = _reference(path, text, [image])
    assert (torch.tensor(out.outputs.embedding) - want).abs().max() <= TOL


def test_chat_messages_with_an_image(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    llm = LLM(path, device="cpu", dtype="float32", runner="pooling", num_kv_blocks=64)
    image = _image(4)
    parts = [{"type": "image_url", "image_url": {"url": image}},
             {"type": "text", "text": "Describe it."}]  # fmt: skip
    (out,) = llm.embed([[{"role": "user", "content": parts}]])
    processor = tf.AutoProcessor.from_pretrained(path)
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    text = processor.apply_chat_template(chat, add_generation_prompt=False)
    want = _reference(path, text, [image])
    assert (torch.tensor(out.outputs.embedding) - want).abs().max() <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_image_prompt_equals_transformers(tmp_path_factory):
    """On CUDA (fp32, the Triton backend's pooling steps): transformers' vector within 1e-4."""
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    llm = LLM(path, device="cuda", dtype="float32", runner="pooling", num_kv_blocks=128)
    text, images = MARK + "What is in the image?", [_image(5)]
    (out,) = llm.embed([{"prompt": text, "multi_modal_data": {"image": images[0]}}])
    want = _reference(path, text, images)
    assert (torch.tensor(out.outputs.embedding) - want).abs().max() <= TOL
