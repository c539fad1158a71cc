"""Content hashes, EXIF orientation, PIL mode conversion and chat-message forms."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from polymodal.processors import load_image
from polymodal.processors.chat import ChatTemplateOptions

MARK = "<|vision_start|><|image_pad|><|vision_end|>"


def _hashes(processor, images):
    result = processor.process(prompt=MARK * len(images), images=images)
    return [item.content_hash for item in result.mm_items]


def test_content_hash(photos, our_processors):
    ours = our_processors["qwen2_vl"]
    a = photos["astronaut"]
    b = photos["camera"]  # same 512x512 size, different picture
    h_a1, h_a2, h_b = _hashes(ours, [a, a.copy(), b])
    assert h_a1 == h_a2 and h_a1 != h_b
    # one changed pixel changes the hash
    changed = np.array(a)
    changed[100, 100] = 255 - changed[100, 100]
    assert _hashes(ours, [Image.fromarray(changed)])[0] != h_a1
    # the same pixels at another resize budget are another encoder input, hence another hash
    other = ours.process(prompt=MARK, images=[a], max_pixels=28 * 28 * 16).mm_items[0]
    assert other.content_hash != h_a1
    # images and videos never share a hash
    video = ours.process(prompt="<|vision_start|><|video_pad|><|vision_end|>", videos=[[a, a]])
    assert video.mm_items[0].content_hash != h_a1


def test_exif_orientation_is_applied(photos):
    image = photos["chelsea"]  # 451x300
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (300, 451)
    assert loaded.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_convert_like_pil(photos, mode):
    source = photos["coffee"].resize((40, 30))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 3)
    else:
        image = source.convert(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.convert("RGB")))


def test_array_and_tensor_layouts(photos):
    import torch

    rgb = np.asarray(photos["tiny"])  # 13x20x3
    expected = np.asarray(load_image(photos["tiny"]))
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(torch.from_numpy(rgb.copy()))), expected)
    chw = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(load_image(chw)), expected)
    gray = load_image(rgb[..., 0])
    np.testing.assert_array_equal(np.asarray(gray)[..., 1], rgb[..., 0])


def test_message_forms(photos, our_processors, tmp_path):
    ours = our_processors["qwen2_5_vl"]
    path = tmp_path / "cat.png"
    photos["tiny"].save(path)
    forms = [
        {"type": "image", "image": str(path)},
        {"type": "image_url", "image_url": {"url": f"file://{path}"}},
        {"image": str(path)},  # Qwen's own form, no "type"
    ]
    results = []
    for part in forms:
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]},
        ]
        results.append(ours.process(messages=messages))
    assert all(r.token_ids == results[0].token_ids for r in results)
    rendered = ours.tokenizer.decode(results[0].token_ids[: results[0].mm_items[0].slot_start])
    assert rendered.endswith("<|vision_start|>") and "You are terse." in rendered
    no_gen = ours.process(
        messages=[{"role": "user", "content": "hi"}],
        template=ChatTemplateOptions(add_generation_prompt=False),
    )
    assert not ours.tokenizer.decode(no_gen.token_ids).endswith("assistant\n")
    assert no_gen.positions == [list(range(len(no_gen.token_ids)))] * 3 and no_gen.mrope_delta == 0
