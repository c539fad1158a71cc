"""Llama 4 processor parity with transformers' `Llama4Processor` (torchvision backend): the same
token ids (tiles row by row with their separators, `<|image|>`, the global view) and the same
pixel values, bit for bit (the same uint8 resize and zero padding, then the bfloat16 rescale and
normalization the reference does), on the photo set, extreme aspect ratios, tiny images and
several images a prompt; at the tiny checkpoint's 28 px tiles (at most 4) and the released
336 px (at most 16), with `max_patches` and `resize_to_max_canvas` per request."""

from __future__ import annotations

import itertools

import pytest
import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.processors.chat import MediaRef
from polymodal.processors.llama4 import Llama4Processor, best_fit, supported_resolutions
from tests.helpers import tiny_checkpoint
from tests.processors.conftest import as_reference_sees

SIZE_CASES = [
    ["astronaut"],  # square: one canvas of several tiles
    ["camera"],  # grayscale
    ["coffee_rgba"],  # alpha composited onto white
    ["chelsea_palette"],
    ["hopper", "rocket_tall", "astronaut_wide"],  # JPEG, tall, very wide
    ["tiny", "coffee", "chelsea"],  # 20x13: one tile, no global view; three images
]
OPTION_CASES = [
    ({"max_patches": 1}, ["coffee", "rocket_tall"]),  # one tile each, no global view
    ({"max_patches": 6}, ["astronaut_wide", "hopper"]),
    ({"resize_to_max_canvas": True}, ["tiny", "chelsea"]),  # upscaled to the largest canvas
]


@pytest.fixture(scope="module", params=[28, 336], ids=["tiny_28px", "released_336px"])
def processors(request, tmp_path_factory):
    """(transformers' processor, ours) with tiles of `param` pixels a side."""
    import transformers as tf

    path = tiny_checkpoint(tmp_path_factory, "llama4_vl")
    hf = tf.AutoProcessor.from_pretrained(path)
    if request.param != 28:
        hf = tf.Llama4Processor(
            image_processor=tf.Llama4ImageProcessor(),  # 336 px, 16 tiles at most
            tokenizer=hf.tokenizer,
            chat_template=hf.chat_template,
            patch_size=14,
        )
        path = tmp_path_factory.mktemp("llama4_336")
        hf.save_pretrained(path)
        hf = tf.AutoProcessor.from_pretrained(path)
    return hf, Llama4Processor.from_pretrained(path)


def _messages(names, photos):
    parts = [{"type": "image", "image": photos[name]} for name in names]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


def _check(ours, hf_out, patch_id):
    ids = hf_out["input_ids"][0].tolist()
    assert ours.token_ids == ids
    got = torch.cat([item.pixel_values() for item in ours.mm_items])
    ref = hf_out["pixel_values"]
    assert ref.dtype == torch.bfloat16 and got.shape == ref.shape
    assert torch.equal(got, ref.float())
    # the items' embedded positions are exactly the reference's `<|patch|>` tokens, in order
    patches = [i for i, t in enumerate(ids) if t == patch_id]
    embedded = [p for item in ours.mm_items for a, b in item.embed_runs() for p in range(a, b)]
    assert embedded == patches


def _patch_id(ours):
    return ours.tokenizer.convert_tokens_to_ids("<|patch|>")


@pytest.mark.parametrize("names", SIZE_CASES, ids=lambda names: "+".join(names))
def test_chat_messages_match_hf(names, photos, processors):
    hf, ours = processors
    messages = _messages(names, photos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [as_reference_sees(photos[n]) for n in names]
    ref = hf(text=[text], images=images, return_tensors="pt")
    result = ours.process(messages=messages)
    _check(result, ref, _patch_id(ours))
    tiles = [item.pixel_values().shape[0] for item in result.mm_items]
    assert [item.num_embeds for item in result.mm_items] == [
        t * ours.tokens_per_tile for t in tiles
    ]


@pytest.mark.parametrize("options,names", OPTION_CASES, ids=["one_tile", "six", "max_canvas"])
def test_options_match_hf(options, names, photos, processors):
    hf, ours = processors
    messages = _messages(names, photos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [as_reference_sees(photos[n]) for n in names]
    ref = hf(text=[text], images=images, return_tensors="pt", **options)
    _check(ours.process(messages=messages, **options), ref, _patch_id(ours))


def test_raw_prompt_and_token_ids_match_hf(photos, processors):
    hf, ours = processors
    images = [photos["hopper"], photos["astronaut_wide"]]
    prompt = "<|image|> and <|image|>: what changed?"
    ref = hf(text=[prompt], images=images, return_tensors="pt")
    by_text = ours.process(prompt=prompt, images=images)
    _check(by_text, ref, _patch_id(ours))
    # the same prompt already tokenized: same ids, spans and hashes
    ids = ours.tokenizer.encode(prompt, add_special_tokens=True)
    by_ids = ours.process_tokens(ids, [MediaRef("image", im) for im in images])
    assert by_ids.token_ids == by_text.token_ids
    assert [(it.slot_start, it.num_slots, it.content_hash) for it in by_ids.mm_items] == [
        (it.slot_start, it.num_slots, it.content_hash) for it in by_text.mm_items
    ]


def test_canvas_choice_matches_hf():
    """`supported_resolutions` and `best_fit` against transformers' own functions over a grid
    of image sizes (upscale, downscale, ties between canvases of one scale)."""
    from transformers.image_utils import SizeDict
    from transformers.models.llama4 import image_processing_llama4 as ref

    for max_tiles, tile in ((4, 28), (16, 336), (6, 14)):
        ours = supported_resolutions(max_tiles, tile)
        theirs = ref.find_supported_resolutions.__wrapped__(
            max_tiles, SizeDict(height=tile, width=tile)
        )
        assert ours == theirs
        sides = (1, 13, tile - 1, tile, tile + 1, 2 * tile + 5, 5 * tile, 900)
        for size, to_max in itertools.product(itertools.product(sides, sides), (False, True)):
            expected = ref.get_best_fit(size, torch.tensor(theirs), resize_to_max_canvas=to_max)
            assert best_fit(size, ours, to_max).tolist() == expected.tolist(), (size, to_max)


@pytest.mark.parametrize("max_patches", [4, 2])
def test_size_grid_matches_hf(processors, max_patches):
    """Random images over a grid of sizes around one and several tiles: the same canvas,
    resized size (transformers' float32 floors included) and pixels."""
    from tests.sdk.vl_reference import random_image

    hf, ours = processors
    if ours.tile != 28:
        pytest.skip("the grid is drawn around 28 px tiles")
    sides = (1, 9, 27, 28, 29, 40, 57, 90, 113, 200)
    images = [random_image(w, h, i) for i, (w, h) in enumerate(itertools.product(sides, sides))]
    for image in images:
        ref = hf(text=["<|image|>"], images=[image], return_tensors="pt", max_patches=max_patches)
        got = ours.process(prompt="<|image|>", images=[image], max_patches=max_patches)
        _check(got, ref, _patch_id(ours))


def test_options_change_the_hash(photos, processors):
    _, ours = processors
    plain = ours.process(prompt="<|image|>", images=[photos["coffee"]]).mm_items[0]
    fewer = ours.process(prompt="<|image|>", images=[photos["coffee"]], max_patches=2)
    assert plain.content_hash != fewer.mm_items[0].content_hash


def test_bad_input_names_the_problem(photos, processors):
    _, ours = processors
    with pytest.raises(MediaError, match="2 images given but the prompt has 1"):
        ours.process(prompt="<|image|>", images=[photos["coffee"]] * 2)
    with pytest.raises(InvalidInputError, match="do_pan_and_scan"):
        ours.process(prompt="<|image|>", images=[photos["coffee"]], do_pan_and_scan=True)
    with pytest.raises(InvalidInputError, match="max_patches must be an integer >= 1, got 0"):
        ours.process(prompt="<|image|>", images=[photos["coffee"]], max_patches=0)
    with pytest.raises(InvalidInputError, match="item 1 is video: .* takes image input only"):
        ours.process(prompt="<|image|>", videos=[[photos["coffee"]] * 2])
