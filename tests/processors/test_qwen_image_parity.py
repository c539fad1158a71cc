"""Image parity with transformers' processor for Qwen2-VL / Qwen2.5-VL.

Reference: `AutoProcessor.from_pretrained(tiny_ckpt)`, which in transformers 5.17 with
torchvision installed is `Qwen2VLProcessor` + `Qwen2VLImageProcessor` (the torchvision
backend, not the PIL `Qwen2VLImageProcessorPil`), run as it runs by default: on the CPU.
Token ids and grids must be identical, pixel values within 1e-5 (equal, at the large sizes).
Ours resize at staging, on the model's device; on a GPU with a bit-exact port of the CPU
kernel (test_gpu_resize.py), so these numbers hold there too.
"""

from __future__ import annotations

import pytest
import torch

from tests.processors.conftest import as_reference_sees

ARCHS = ["qwen2_vl", "qwen2_5_vl"]

SIZE_CASES = [
    ["astronaut"],
    ["camera"],  # grayscale (L)
    ["coffee_rgba"],  # RGBA: composited onto white (transformers 5.24; 5.17 dropped alpha)
    ["chelsea_palette"],  # P
    ["hopper", "rocket_tall", "astronaut_wide"],  # tall / very wide / JPEG
    ["tiny", "coffee", "chelsea"],  # upscaled to min_pixels; 3 images in one prompt
]


def _hf(hf_proc, text, images, min_pixels=None, max_pixels=None):
    """transformers' ids, pixels and grids; pixel bounds as its `size` (the `min_pixels` /
    `max_pixels` call arguments are deprecated there since 5.23)."""
    kwargs = {}
    if min_pixels is not None:
        kwargs["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    out = hf_proc(text=[text], images=images or None, return_tensors="pt", **kwargs)
    return out["input_ids"][0].tolist(), out.get("pixel_values"), out.get("image_grid_thw")


def _check(ours, ids, pixel_values, grids, atol=1e-5):
    assert ours.token_ids == ids
    assert [item.modality for item in ours.mm_items] == ["image"] * len(grids)
    torch.testing.assert_close(torch.cat([it.data["grid_thw"] for it in ours.mm_items]), grids)
    got = torch.cat([it.pixel_values() for it in ours.mm_items])
    assert got.dtype == torch.float32 and got.shape == pixel_values.shape
    assert (got - pixel_values).abs().max().item() <= atol


def _content(names, photos):
    parts = [{"type": "image", "image": photos[name]} for name in names]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this image."}]}]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("names", SIZE_CASES, ids=lambda names: "+".join(names))
def test_chat_messages_match_hf(arch, names, photos, hf_processors, our_processors):
    hf_proc, ours = hf_processors[arch], our_processors[arch]
    messages = _content(names, photos)
    text = hf_proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids, pixel_values, grids = _hf(hf_proc, text, [as_reference_sees(photos[n]) for n in names])
    result = ours.process(messages=messages)
    _check(result, ids, pixel_values, grids)
    # slots: each item's range holds exactly its image tokens, in order, t*h*w/4 of them
    image_id = ours.config.image_token_id
    for item in result.mm_items:
        assert item.num_slots == int(item.data["grid_thw"].prod()) // 4
        slots = result.token_ids[item.slot_start : item.slot_start + item.num_slots]
        assert set(slots) == {image_id}
    assert sum(it.num_slots for it in result.mm_items) == result.token_ids.count(image_id)


def _photo(width: int, height: int, mode: str):
    """A real photograph at `width x height` with a little noise (JPEG-like texture)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(width * height)
    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(base).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = np.linspace(0, 255, width, dtype=np.uint8)[None].repeat(height, 0)
        image.putalpha(Image.fromarray(alpha))
    return image.convert(mode)


# Qwen2.5-VL-7B's own bounds: a 1080p photo is resized to 1092x1932 (scale ~1.01, not skipped)
QWEN25_7B_BOUNDS = {"min_pixels": 3136, "max_pixels": 12845056}


@pytest.mark.parametrize(
    "width,height,mode",
    [(1920, 1080, "RGB"), (1001, 667, "RGBA"), (799, 601, "L"), (333, 517, "RGB")],
)
def test_large_and_odd_sizes_equal_hf(width, height, mode, hf_processors, our_processors):
    hf_proc, ours = hf_processors["qwen2_5_vl"], our_processors["qwen2_5_vl"]
    image = _photo(width, height, mode)
    marker = "<|vision_start|><|image_pad|><|vision_end|>"
    ids, pixel_values, grids = _hf(hf_proc, marker, [as_reference_sees(image)], **QWEN25_7B_BOUNDS)
    result = ours.process(prompt=marker, images=[image], **QWEN25_7B_BOUNDS)
    _check(result, ids, pixel_values, grids, atol=0.0)


def test_raw_prompt_and_pixel_overrides_match_hf(photos, hf_processors, our_processors):
    hf_proc, ours = hf_processors["qwen2_vl"], our_processors["qwen2_vl"]
    marker = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = f"Look: {marker} and {marker}!"
    images = [photos["hopper"], photos["coffee"]]
    small = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 20}
    large = {"min_pixels": 28 * 28 * 300, "max_pixels": 28 * 28 * 400}
    for bounds in (small, large):
        ids, pixel_values, grids = _hf(hf_proc, prompt, images, **bounds)
        _check(ours.process(prompt=prompt, images=images, **bounds), ids, pixel_values, grids)
    # the override really changed something (otherwise the check above proves little)
    default_ids = ours.process(prompt=prompt, images=images).token_ids
    assert ours.process(prompt=prompt, images=images, **small).token_ids != default_ids


def test_image_sources_give_identical_items(photos, our_processors, tmp_path):
    import base64

    import numpy as np

    ours = our_processors["qwen2_5_vl"]
    image = photos["chelsea"]
    path = tmp_path / "chelsea.png"
    image.save(path)
    png = path.read_bytes()
    array = np.asarray(image)
    sources = [
        image,
        str(path),
        path,
        png,
        "data:image/png;base64," + base64.b64encode(png).decode(),
        {"url": "file://" + str(path)},
        array,
        torch.from_numpy(array.copy()),  # HWC
        torch.from_numpy(array.copy()).permute(2, 0, 1),  # CHW
    ]
    hashes = set()
    for source in sources:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": source}]}]
        if not isinstance(source, dict):
            messages = [{"role": "user", "content": [{"type": "image", "image": source}]}]
        hashes.add(ours.process(messages=messages).mm_items[0].content_hash)
    assert len(hashes) == 1
