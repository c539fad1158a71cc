"""Mllama processor parity with transformers' `MllamaProcessor` (torchvision backend): the same
token ids, the same pixel values (max abs diff <= 1e-6: the same uint8 resize, zero padding,
tiling, float32 normalization), aspect ratio ids and masks (from the tile counts), and the
cross-attention mask (rebuilt from the model's row ranges), on the photo set, extreme aspect
ratios, tiny images, several and adjacent images, raw prompts; at the tiny checkpoint's 28 px
tiles and at the released 560 px."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.errors import MediaError
from polymodal.llm_core.models.mllama import cross_row_ranges
from polymodal.processors.mllama import MllamaProcessor, best_canvas, tile_arrangements
from polymodal.processors.types import CROSS_ATTENTION
from tests.helpers import tiny_checkpoint
from tests.processors.conftest import as_reference_sees

CASES = [
    ["astronaut"],
    ["camera"],  # grayscale
    ["coffee_rgba"],  # alpha composited onto white
    ["chelsea_palette"],
    ["hopper", "rocket_tall", "astronaut_wide"],  # JPEG, tall, very wide
    ["tiny", "coffee", "chelsea"],  # 20x13 upscaled; three images in one prompt
]


@pytest.fixture(scope="module", params=[28, 560], ids=["tiny_28px", "released_560px"])
def processors(request, tmp_path_factory):
    """(transformers' processor, ours) with tiles of `param` pixels."""
    import transformers as tf

    path = tiny_checkpoint(tmp_path_factory, "mllama")
    hf = tf.AutoProcessor.from_pretrained(path)
    if request.param != 28:
        images = tf.MllamaImageProcessor(
            size={"height": 560, "width": 560},
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
        hf = tf.MllamaProcessor(image_processor=images, tokenizer=hf.tokenizer,
                                chat_template=hf.chat_template)  # fmt: skip
        path = tmp_path_factory.mktemp("mllama_560")
        hf.save_pretrained(path)
        hf = tf.AutoProcessor.from_pretrained(path)
    return hf, MllamaProcessor.from_pretrained(path)


def _messages(names, photos, text="Describe this."):
    parts = [{"type": "image", "image": photos[name]} for name in names]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _check(ours, ref, tile_rows=17, max_tiles=4):
    ids = ref["input_ids"][0].tolist()
    assert ours.token_ids == ids
    items = ours.mm_items
    assert all(item.target == CROSS_ATTENTION and item.num_slots == 1 for item in items)
    assert all(item.num_embeds == max_tiles * tile_rows for item in items)
    if not items:
        assert "pixel_values" not in ref
        return
    got = torch.stack([item.pixel_values() for item in items])
    want = ref["pixel_values"][0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-6
    tiles = [int(item.data["num_tiles"]) for item in items]
    ratio_ids = [int(item.data["aspect_ratio_id"]) for item in items]
    assert ratio_ids == ref["aspect_ratio_ids"][0].tolist()
    mask = ref["aspect_ratio_mask"][0]
    assert mask.sum(-1).tolist() == tiles and mask[:, 0].all()
    # the token -> (image, tile) mask transformers builds, from our row ranges
    pieces = cross_row_ranges([item.slot_start for item in items], tiles, len(ids), tile_rows,
                              max_tiles)  # fmt: skip
    offsets = [sum(tiles[:i]) * tile_rows for i in range(len(tiles))]
    dense = torch.zeros(len(ids), len(items), max_tiles, dtype=torch.long)
    for k, (first, lo, hi, gate) in enumerate(pieces):
        end = pieces[k + 1][0] if k + 1 < len(pieces) else len(ids)
        for i, n in enumerate(tiles):
            for t in range(n):
                row = offsets[i] + t * tile_rows
                dense[first:end, i, t] = int(gate == 1 and lo <= row < hi)
    assert torch.equal(dense, ref["cross_attention_mask"][0])


@pytest.mark.parametrize("names", CASES, ids=lambda names: "+".join(names))
def test_chat_messages_match_hf(names, photos, processors):
    hf, ours = processors
    msgs = _messages(names, photos)
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    images = [as_reference_sees(photos[name]) for name in names]
    ref = hf(text=[text], images=[images], return_tensors="pt")
    tile_rows = (ours.tile // (7 if ours.tile == 28 else 14)) ** 2 + 1
    _check(ours.process(messages=msgs), ref, tile_rows)


@pytest.mark.parametrize(
    "prompt",
    [
        "<|image|>What is this?",  # BOS goes after the leading image
        "<|image|><|image|>Two adjacent images, then text",
        "First <|image|> then <|image|> and more text",
        "<|begin_of_text|>Has its BOS <|image|>",
    ],
)
def test_raw_prompts_match_hf(prompt, photos, processors):
    hf, ours = processors
    names = ["coffee", "astronaut_wide"][: prompt.count("<|image|>")]
    images = [as_reference_sees(photos[name]) for name in names]
    ref = hf(text=[prompt], images=[images], return_tensors="pt")
    tile_rows = (ours.tile // (7 if ours.tile == 28 else 14)) ** 2 + 1
    _check(ours.process(prompt=prompt, images=[photos[n] for n in names]), ref, tile_rows)


def test_text_only_prompt(processors):
    hf, ours = processors
    msgs = [{"role": "user", "content": "Hello, how are you today?"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out = ours.process(messages=msgs)
    assert out.token_ids == hf(text=[text])["input_ids"][0] and out.mm_items == []


def test_canvas_choice_matches_transformers():
    from transformers.models.mllama.image_processing_mllama import (
        get_all_supported_aspect_ratios,
        get_optimal_tiled_canvas,
    )

    assert tile_arrangements(4) == get_all_supported_aspect_ratios(4)
    for h, w in [(1, 1), (560, 560), (561, 560), (20, 3000), (3000, 20), (800, 1200), (1120, 1)]:
        want = tuple(int(x) for x in get_optimal_tiled_canvas(h, w, 4, 560))
        assert best_canvas(h, w, 4, 560) == want


def test_image_count_mismatch_names_the_image(photos, processors):
    _, ours = processors
    with pytest.raises(MediaError, match="placeholder"):
        ours.process(prompt="no image token", images=[photos["coffee"]])
