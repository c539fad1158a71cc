"""Pixtral / Mistral 3 processor parity with transformers' `PixtralProcessor` (torchvision):
the same token ids (`[IMG]` rows, `[IMG_BREAK]`, `[IMG_END]`), the same pixel values (max abs
diff <= 1e-6), on the photo set, extreme aspect ratios, tiny images and several images a
prompt; at the tiny checkpoints' sizes and at Pixtral-12B's (1024 px, 16 px patches) and
Mistral 3's (1540 px, 14 px patches merged 2x2)."""

from __future__ import annotations

import pytest
from PIL import Image

from polymodal.llm_core.errors import MediaError
from polymodal.processors.pixtral import PixtralProcessor, pixtral_size
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
RELEASED = {"pixtral": (1024, 16, 1), "mistral3": (1540, 14, 2)}  # longest edge, patch, merge
VARIANTS = ["pixtral@tiny", "mistral3@tiny", "pixtral@released", "mistral3@released"]


@pytest.fixture(scope="module", params=VARIANTS)
def processors(request, tmp_path_factory):
    import transformers as tf

    arch, size = request.param.split("@")
    path = tiny_checkpoint(tmp_path_factory, arch)
    hf = tf.AutoProcessor.from_pretrained(path)
    if size == "released":
        longest, patch, merge = RELEASED[arch]
        images = tf.PixtralImageProcessor(
            size={"longest_edge": longest}, patch_size={"height": patch, "width": patch}
        )
        hf = tf.PixtralProcessor(
            image_processor=images,
            tokenizer=hf.tokenizer,
            patch_size=patch,
            spatial_merge_size=merge,
            chat_template=hf.chat_template,
        )
        path = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(path)
        hf = tf.AutoProcessor.from_pretrained(path)
    return hf, PixtralProcessor.from_pretrained(path)


def _messages(names, photos):
    parts = [{"type": "image", "image": photos[name]} for name in names]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


def _check(ours, ref, processor):
    assert ours.token_ids == ref["input_ids"][0].tolist()
    for i, item in enumerate(ours.mm_items):
        got = item.pixel_values()[0]
        h, w = ref["image_sizes"][i].tolist()
        assert got.shape == (3, h, w)
        assert (got - ref["pixel_values"][i, :, :h, :w]).abs().max().item() <= 1e-6
        # the span's [IMG] positions take embeddings; its [IMG_BREAK]s do not
        span = ours.token_ids[item.slot_start : item.slot_end]
        mask = [True] * len(span) if item.embed_mask is None else item.embed_mask.tolist()
        image_id = processor.embed_token_id
        break_id = processor.tokenizer.convert_tokens_to_ids(processor.break_token)
        assert {t for t, m in zip(span, mask) if m} == {image_id}
        assert {t for t, m in zip(span, mask) if not m} <= {break_id}


@pytest.mark.parametrize("names", SIZE_CASES, ids=lambda names: "+".join(names))
def test_chat_messages_match_hf(names, photos, processors):
    hf, ours = processors
    messages = _messages(names, photos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=[as_reference_sees(photos[n]) for n in names], return_tensors="pt")
    _check(ours.process(messages=messages), ref, ours)


def test_raw_prompt_matches_hf(photos, processors):
    hf, ours = processors
    images = [photos["rocket_tall"], photos["tiny"]]
    prompt = "[IMG] then [IMG]: compare."
    ref = hf(text=[prompt], images=images, return_tensors="pt")
    _check(ours.process(prompt=prompt, images=images), ref, ours)


def test_resize_rule():
    assert pixtral_size(512, 512, 1024, 16) == (512, 512)  # never grown
    assert pixtral_size(600, 2000, 1024, 16) == (320, 1024)  # fit, then up to 16s
    assert pixtral_size(13, 20, 1540, 28) == (28, 28)  # tiny: one merged patch


def test_a_side_that_shrinks_to_nothing_names_the_image(processors):
    ours = processors[1]
    with pytest.raises(MediaError, match=r"image 2 .*aspect ratio is too extreme"):
        ours.process(messages=_messages_of([Image.new("RGB", (8, 8)), Image.new("RGB", (9000, 4))]))


def _messages_of(images):
    parts = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]
