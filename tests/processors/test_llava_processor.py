"""LLaVA-1.5 and LLaVA-NeXT processor parity with transformers (torchvision image processors):
the same token ids, the same pixel values (max abs diff <= 1e-6), on the photo set, extreme
aspect ratios, tiny images and several images a prompt; at the tiny checkpoints' 28 px and at
the released 336 px sizes (LLaVA-NeXT's five pinpoints; LLaVA-1.5 with and without padding to
a square)."""

from __future__ import annotations

import pytest
import torch

from polymodal.processors.llava import (
    LlavaNextProcessor,
    LlavaProcessor,
    select_best_resolution,
    unpad_box,
)
from tests.helpers import tiny_checkpoint
from tests.processors.conftest import as_reference_sees

SIZE_CASES = [
    ["astronaut"],
    ["camera"],
    ["coffee_rgba"],
    ["chelsea_palette"],
    ["hopper", "rocket_tall", "astronaut_wide"],
    ["tiny", "coffee", "chelsea"],
]
RELEASED = {
    "llava": dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    "llava_next": dict(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    ),
}
VARIANTS = ["llava@28", "llava_next@28", "llava@336", "llava_padded@336", "llava_next@336"]


@pytest.fixture(scope="module", params=VARIANTS)
def processors(request, tmp_path_factory):
    """(transformers' processor, ours) for one variant."""
    import transformers as tf

    arch, size = request.param.split("@")
    base = "llava_next" if arch == "llava_next" else "llava"
    path = tiny_checkpoint(tmp_path_factory, base)
    hf = tf.AutoProcessor.from_pretrained(path)
    if size == "336":
        common = dict(
            tokenizer=hf.tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=hf.chat_template,
        )
        if arch == "llava_next":
            images = tf.LlavaNextImageProcessor(**RELEASED["llava_next"])
            hf = tf.LlavaNextProcessor(image_processor=images, **common)
        elif arch == "llava_padded":
            images = tf.LlavaImageProcessor(**RELEASED["llava"], do_pad=True)
            hf = tf.LlavaProcessor(image_processor=images, **common)
        else:
            images = tf.CLIPImageProcessor(**RELEASED["llava"])
            hf = tf.LlavaProcessor(image_processor=images, **common)
        path = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(path)
        hf = tf.AutoProcessor.from_pretrained(path)
    cls = LlavaNextProcessor if arch == "llava_next" else LlavaProcessor
    return hf, cls.from_pretrained(path)


def _messages(names, photos):
    parts = [{"type": "image", "image": photos[name]} for name in names]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


def _check(ours, ref):
    assert ours.token_ids == ref["input_ids"][0].tolist()
    expected = ref["pixel_values"]
    each = [item.pixel_values() for item in ours.mm_items]  # [views, C, S, S] each
    if expected.dim() == 5:  # LLaVA-NeXT: [images, max views, C, S, S], zero-padded views
        expected = torch.cat([expected[i, : got.shape[0]] for i, got in enumerate(each)])
    got = torch.cat(each)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("names", SIZE_CASES, ids=lambda names: "+".join(names))
def test_chat_messages_match_hf(names, photos, processors):
    hf, ours = processors
    messages = _messages(names, photos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=[as_reference_sees(photos[n]) for n in names], return_tensors="pt")
    result = ours.process(messages=messages)
    _check(result, ref)
    image_id = ours.embed_token_id
    assert sum(item.num_embeds for item in result.mm_items) == result.token_ids.count(image_id)


def test_raw_prompt_matches_hf(photos, processors):
    hf, ours = processors
    images = [photos["hopper"], photos["astronaut_wide"]]
    prompt = "<image>\n<image>\nWhat differs?"
    _check(
        ours.process(prompt=prompt, images=images),
        hf(text=[prompt], images=images, return_tensors="pt"),
    )


def test_anyres_geometry():
    pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    assert select_best_resolution((400, 600), pinpoints) == (672, 672)
    assert select_best_resolution((100, 900), pinpoints) == (336, 1008)
    # a 2:1 image on a 2x2 grid of 24x24 features: 24 rows of padding split top and bottom
    assert unpad_box((300, 600), 48, 48) == (12, 24, 0, 48)
    assert unpad_box((600, 301), 48, 48) == (0, 48, 12, 24)
