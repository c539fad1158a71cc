"""Gemma 3 processor parity with transformers' `Gemma3Processor` (torchvision backend): the same
token ids and the same pixel values (max abs diff <= 1e-6: the same uint8 resize, then the same
float32 normalization), on the photo set, extreme aspect ratios, tiny images, several images a
prompt, pan-and-scan crops; at the tiny checkpoint's 28 px and at the released 896 px."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.processors.gemma3 import Gemma3Processor, pan_and_scan_boxes
from tests.helpers import tiny_checkpoint
from tests.processors.conftest import as_reference_sees

SIZE_CASES = [
    ["astronaut"],
    ["camera"],  # grayscale
    ["coffee_rgba"],  # alpha composited onto white
    ["chelsea_palette"],
    ["hopper", "rocket_tall", "astronaut_wide"],  # JPEG, tall, very wide
    ["tiny", "coffee", "chelsea"],  # 20x13 upscaled; three images in one prompt
]
PAN_AND_SCAN = [
    ({"do_pan_and_scan": True}, ["coffee", "astronaut"]),  # 600x400: 2 crops; square: none
    (
        {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32},
        ["astronaut_wide", "rocket_tall"],
    ),
    (
        {
            "do_pan_and_scan": True,
            "pan_and_scan_max_num_crops": 3,
            "pan_and_scan_min_crop_size": 20,
        },
        ["astronaut_wide", "tiny", "chelsea"],
    ),
]


@pytest.fixture(scope="module", params=[28, 896], ids=["tiny_28px", "released_896px"])
def processors(request, tmp_path_factory):
    """(transformers' processor, ours) with images of `param` pixels a side."""
    import transformers as tf

    path = tiny_checkpoint(tmp_path_factory, "gemma3_vl")
    hf = tf.AutoProcessor.from_pretrained(path)
    if request.param != 28:
        hf = tf.Gemma3Processor(
            image_processor=tf.Gemma3ImageProcessor(size={"height": 896, "width": 896}),
            tokenizer=hf.tokenizer,
            chat_template=hf.chat_template,
            image_seq_length=256,
        )
        path = tmp_path_factory.mktemp("gemma3_896")
        hf.save_pretrained(path)
        hf = tf.AutoProcessor.from_pretrained(path)
    return hf, Gemma3Processor.from_pretrained(path)


def _messages(names, photos):
    parts = [{"type": "image", "image": photos[name]} for name in names]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


def _check(ours, hf_out):
    assert ours.token_ids == hf_out["input_ids"][0].tolist()
    got = torch.cat([item.pixel_values() for item in ours.mm_items])
    ref = hf_out["pixel_values"]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-6
    # the items' embedded runs are exactly the tokens transformers marks as image (type 1)
    types = hf_out["token_type_ids"][0].tolist()
    marked = [i for i, t in enumerate(types) if t == 1]
    ours_marked = [p for item in ours.mm_items for a, b in item.embed_runs() for p in range(a, b)]
    assert ours_marked == marked


@pytest.mark.parametrize("names", SIZE_CASES, ids=lambda names: "+".join(names))
def test_chat_messages_match_hf(names, photos, processors):
    hf, ours = processors
    messages = _messages(names, photos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=[as_reference_sees(photos[n]) for n in names], return_tensors="pt")
    result = ours.process(messages=messages)
    _check(result, ref)
    assert [item.num_embeds for item in result.mm_items] == [hf.image_seq_length] * len(names)


@pytest.mark.parametrize("options,names", PAN_AND_SCAN, ids=["default", "min32", "max3"])
def test_pan_and_scan_matches_hf(options, names, photos, processors):
    hf, ours = processors
    messages = _messages(names, photos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [as_reference_sees(photos[n]) for n in names]
    ref = hf(text=[text], images=images, return_tensors="pt", **options)
    result = ours.process(messages=messages, **options)
    _check(result, ref)
    crops = [item.pixel_values().shape[0] for item in result.mm_items]
    assert sum(crops) == ref["pixel_values"].shape[0] and max(crops) > 1  # crops were made


def test_raw_prompt_and_token_ids_match_hf(photos, processors):
    hf, ours = processors
    images = [photos["hopper"], photos["coffee"]]
    prompt = "<start_of_image> and <start_of_image>: what changed?"
    ref = hf(text=[prompt], images=images, return_tensors="pt")
    _check(ours.process(prompt=prompt, images=images), ref)
    # the same prompt already tokenized: same ids, items and hashes
    ids = ours.tokenizer.encode(prompt, add_special_tokens=True)
    from polymodal.processors.chat import MediaRef

    by_ids = ours.process_tokens(ids, [MediaRef("image", im) for im in images])
    by_text = ours.process(prompt=prompt, images=images)
    assert [it.content_hash for it in by_ids.mm_items] == [
        it.content_hash for it in by_text.mm_items
    ]
    assert [(it.slot_start, it.num_slots) for it in by_ids.mm_items] == [
        (it.slot_start, it.num_slots) for it in by_text.mm_items
    ]


def test_options_change_the_hash(photos, processors):
    _, ours = processors
    plain = ours.process(prompt="<start_of_image>", images=[photos["coffee"]]).mm_items[0]
    scanned = ours.process(
        prompt="<start_of_image>", images=[photos["coffee"]], do_pan_and_scan=True
    ).mm_items[0]
    assert plain.content_hash != scanned.content_hash


def test_bad_input_names_the_problem(photos, processors):
    _, ours = processors
    with pytest.raises(MediaError, match="2 images given but the prompt has 1"):
        ours.process(prompt="<start_of_image>", images=[photos["coffee"]] * 2)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        ours.process(prompt="<start_of_image>", images=[photos["coffee"]], max_pixels=100)
    with pytest.raises(InvalidInputError, match="item 1 is video: .* takes image input only"):
        ours.process(prompt="<start_of_image>", videos=[[photos["coffee"]] * 2])


def test_pan_and_scan_boxes_cover_the_long_side():
    assert pan_and_scan_boxes(400, 600, 256, 4, 1.2) == [(0, 0, 400, 300), (0, 300, 400, 300)]
    assert pan_and_scan_boxes(512, 512, 256, 4, 1.2) == []  # square: below the ratio
    assert pan_and_scan_boxes(100, 700, 32, 4, 1.2) == [(0, 175 * i, 100, 175) for i in range(4)]
    assert pan_and_scan_boxes(100, 700, 256, 4, 1.2) == []  # crops narrower than 256
