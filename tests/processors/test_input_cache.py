"""The processed-input cache: a repeated image or video (same bytes, same options) skips
decoding and resizing and gives the same item; other bytes, options or limits miss; the cache
is bounded by bytes and safe across threads."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch

from polymodal.processors import qwen_vl
from polymodal.processors.input_cache import ProcessedInputCache, raw_media_key
from polymodal.processors.qwen_vl import QwenVLProcessor

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _jpeg(image, size=(320, 240)) -> bytes:
    buffer = io.BytesIO()
    image.resize(size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture()
def fresh(our_processors):
    """A processor of its own (the session's shared one keeps its cache between tests)."""
    shared = our_processors["qwen2_5_vl"]
    return QwenVLProcessor(shared.tokenizer, shared.config)


@pytest.fixture()
def decodes(monkeypatch):
    calls = []
    real_image, real_video = qwen_vl.load_image, qwen_vl.load_video
    monkeypatch.setattr(
        qwen_vl, "load_image", lambda *a, **k: calls.append(1) or real_image(*a, **k)
    )
    monkeypatch.setattr(
        qwen_vl, "load_video", lambda *a, **k: calls.append(1) or real_video(*a, **k)
    )
    return calls


def _same(a, b, same_key=True):
    assert (a.content_hash == b.content_hash) is same_key
    assert a.data.keys() == b.data.keys()
    for name in a.data:
        assert torch.equal(a.data[name], b.data[name])
    assert (a.slot_start, a.num_slots) == (b.slot_start, b.num_slots)


def test_repeated_bytes_skip_decoding(fresh, decodes, photos, tmp_path):
    data = _jpeg(photos["astronaut"])
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    first = fresh.process(prompt="x " + IMAGE, images=[data])
    assert len(decodes) == 1
    # the same bytes as bytes, a path and a data: URL: one entry, no more decoding
    for source in (data, path, str(path), url):
        again = fresh.process(prompt="x " + IMAGE, images=[source])
        _same(again.mm_items[0], first.mm_items[0])
        assert again.token_ids == first.token_ids
    assert len(decodes) == 1 and fresh.input_cache.hits == 4
    # a hit is a copy: staging or re-slotting it leaves the cached entry alone
    hit = fresh.process(prompt="longer prompt " + IMAGE, images=[data]).mm_items[0]
    assert hit.slot_start != first.mm_items[0].slot_start
    hit.data["pixel_frames"] = None
    _same(fresh.process(prompt="x " + IMAGE, images=[data]).mm_items[0], first.mm_items[0])


def test_other_bytes_options_or_limits_miss(fresh, decodes, photos):
    data = _jpeg(photos["astronaut"])
    other = _jpeg(photos["camera"])
    base = fresh.process(prompt=IMAGE, images=[data]).mm_items[0]
    small = fresh.process(prompt=IMAGE, images=[data], max_pixels=28 * 28 * 16).mm_items[0]
    assert small.content_hash != base.content_hash and small.num_slots < base.num_slots
    assert fresh.process(prompt=IMAGE, images=[other]).mm_items[0].content_hash != base.content_hash
    assert len(decodes) == 3
    fresh.max_image_pixels = 320 * 240 - 1  # a lower limit is checked again, not served cached
    with pytest.raises(Exception, match="exceeds the limit"):
        fresh.process(prompt=IMAGE, images=[data])


def test_arrays_are_not_cached(fresh, decodes, photos):
    image = photos["astronaut"].resize((64, 64))
    for _ in range(2):
        fresh.process(prompt=IMAGE, images=[np.asarray(image)])
    assert len(decodes) == 2 and len(fresh.input_cache) == 0
    assert raw_media_key(np.asarray(image)) is None
    assert raw_media_key("https://example.com/a.jpg") is None


def test_pil_images_hit_by_their_pixels(fresh, decodes, photos):
    from PIL import Image

    def image():  # a new PIL object each call, the same pixels
        return photos["astronaut"].convert("RGB").resize((64, 48))

    first = fresh.process(prompt="x " + IMAGE, images=[image()]).mm_items[0]
    again = fresh.process(prompt="x " + IMAGE, images=[image()]).mm_items[0]
    _same(again, first)
    assert len(decodes) == 1 and fresh.input_cache.hits == 1
    # one pixel changed in place: a miss, another content hash
    changed = image()
    changed.putpixel((5, 7), (1, 2, 3))
    other = fresh.process(prompt="x " + IMAGE, images=[changed]).mm_items[0]
    assert other.content_hash != first.content_hash
    # the same pixels with an EXIF rotation load rotated: another key
    rotated = image()
    rotated.getexif()[0x0112] = 6
    decoded = len(decodes)
    turned = fresh.process(prompt="x " + IMAGE, images=[rotated]).mm_items[0]
    assert len(decodes) == decoded + 1 and turned.content_hash != first.content_hash
    assert torch.equal(
        turned.data["pixel_frames"][0],
        torch.from_numpy(np.array(image().rotate(-90, expand=True))).permute(2, 0, 1),
    )
    decoded = len(decodes)
    # a palette image has no key (its pixels are indices): decoded every time
    palette = image().convert("P")
    assert raw_media_key(palette) is None
    for _ in range(2):
        fresh.process(prompt="x " + IMAGE, images=[palette])
    assert len(decodes) == decoded + 2
    assert isinstance(palette, Image.Image)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_video_files_hit_with_the_same_sampling(fresh, decodes, video_file):
    first = fresh.process(prompt=VIDEO, videos=[video_file], num_frames=4).mm_items[0]
    again = fresh.process(prompt=VIDEO, videos=[video_file], num_frames=4)
    _same(again.mm_items[0], first)
    assert again.mm_items[0].second_per_grid == first.second_per_grid
    assert len(decodes) == 1
    fresh.process(prompt=VIDEO, videos=[video_file], num_frames=2)
    assert len(decodes) == 2


def test_frame_lists_hit_by_content(fresh, decodes, photos):
    from PIL import Image

    def frames():  # new PIL objects each call, the same pixels
        return [photos["astronaut"].resize((56, 56)) for _ in range(2)] + [
            photos["camera"].convert("RGB").resize((56, 56)) for _ in range(2)
        ]

    first = fresh.process(prompt=VIDEO, videos=[frames()]).mm_items[0]
    again = fresh.process(prompt=VIDEO, videos=[frames()])
    _same(again.mm_items[0], first)
    assert len(decodes) == 1 and fresh.input_cache.hits == 1
    # the same pixels as arrays: their own key (PIL frames are hashed in place, as Pillow
    # holds them, and the item's content hash follows from that key: a fresh video's pixels
    # are hashed once), the same pixels; the arrays again: a hit, the same item
    as_arrays = [np.asarray(f) for f in frames()]
    from_arrays = fresh.process(prompt=VIDEO, videos=[as_arrays]).mm_items[0]
    _same(from_arrays, first, same_key=False)
    _same(fresh.process(prompt=VIDEO, videos=[as_arrays]).mm_items[0], from_arrays)
    assert len(decodes) == 2 and fresh.input_cache.hits == 2
    # one pixel changed: a miss, and the item differs
    pixels = np.asarray(frames()[3]).copy()
    pixels[7, 9, 1] ^= 1
    changed = frames()[:3] + [Image.fromarray(pixels)]
    other = fresh.process(prompt=VIDEO, videos=[changed]).mm_items[0]
    assert len(decodes) == 3 and other.content_hash != first.content_hash
    # another rate is another key (second_per_grid is part of the item)
    fresh.process(prompt=VIDEO, videos=[frames()], fps=12)
    assert len(decodes) == 4


def test_bounded_by_bytes_least_recent_out(photos):
    cache = ProcessedInputCache(max_mb=1)
    item = qwen_vl.QwenMediaItem(
        "image", {"x": torch.zeros(400_000, dtype=torch.uint8)}, -1, 0, "h"
    )
    for key in "abc":
        cache.put((key,), item)
    assert len(cache) == 2 and cache.get(("a",)) is None and cache.get(("c",)) is not None
    cache.get(("b",))
    cache.put(("d",), item)  # evicts c (b was used since)
    assert cache.get(("b",)) is not None and cache.get(("c",)) is None
    huge = qwen_vl.QwenMediaItem(
        "image", {"x": torch.zeros(2 << 20, dtype=torch.uint8)}, -1, 0, "h"
    )
    cache.put(("huge",), huge)  # larger than the bound: not kept, nothing evicted
    assert cache.get(("huge",)) is None and len(cache) == 2


def test_threads_share_one_cache(fresh, photos):
    images = [_jpeg(photos[name]) for name in ("astronaut", "camera", "coffee")]
    results, errors = [], []

    def work():
        try:
            for data in images * 3:
                results.append(fresh.process(prompt=IMAGE, images=[data]).mm_items[0].content_hash)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 36 and len(set(results)) == 3
    assert len(fresh.input_cache) == 3


FAMILIES = ["gemma3_vl", "llava_next", "pixtral", "llama4_vl", "mllama"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_reuses_processed_bytes(arch, tmp_path_factory, photos, monkeypatch):
    """The shared MediaProcessor flow: the same bytes again reuse the processed item and its
    expansion (same ids, pixels and hash as the first time and as the decoded image), without
    decoding again."""
    from polymodal.llm_core.registry import processor_class
    from polymodal.processors import base
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, arch)
    proc = processor_class(_architecture(path)).from_pretrained(path)
    data = _jpeg(photos["astronaut"], (200, 120))
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    message[0]["content"][0]["image"] = data
    first = proc.process(messages=message)
    calls = []
    real = base.load_image
    monkeypatch.setattr(base, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = proc.process(messages=message)
    assert calls == [] and again.token_ids == first.token_ids
    for a, b in zip(again.mm_items, first.mm_items):
        _same(a, b)
    message[0]["content"][0]["image"] = real(data)  # a decoded image: loaded, the same item
    decoded = proc.process(messages=message)
    assert calls == [1] and decoded.token_ids == first.token_ids
    assert [i.content_hash for i in decoded.mm_items] == [i.content_hash for i in first.mm_items]


def _architecture(path) -> str:
    import json

    return json.loads((path / "config.json").read_text())["architectures"][0]


@pytest.mark.parametrize("arch", ["gemma3_vl", "qwen2_5_vl"])
def test_cached_items_generate_as_decoded_ones(arch, tmp_path_factory, photos):
    """Served twice from the cache (staged and encoded each time, in one batch and in the
    next call), an image's bytes give the tokens its decoded image gives."""
    from polymodal import LLM, SamplingParams
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, arch)
    # no prefix or encoder-output reuse: every request stages and encodes its item
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256, warmup=False,
              enable_prefix_caching=False, encoder_cache_mb=0.001)  # fmt: skip
    data = _jpeg(photos["astronaut"], (120, 90))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def chat(image):
        parts = [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]
        return [{"role": "user", "content": parts}]

    from polymodal.processors.media import load_image

    want = [o.outputs[0].token_ids for o in llm.chat([chat(load_image(data))], params)]
    for _ in range(2):
        got = [o.outputs[0].token_ids for o in llm.chat([chat(data), chat(data)], params)]
        assert got == want * 2


def test_image_key_reads_the_pixels_in_place(photos, tmp_path):
    import blake3
    from PIL import Image

    from polymodal.processors.hashing import hash_pixels, image_key
    from polymodal.processors.media import hold_images_in_one_block

    # an RGB image is held as RGBX; from an array X is 255: the bytes of its RGBA form
    image = Image.fromarray(np.asarray(photos["astronaut"].convert("RGB").resize((96, 64))))
    viewed = blake3.blake3()
    assert hash_pixels(viewed, image, b"t")
    copied = blake3.blake3(b"t" + np.asarray(image.convert("RGBA")).tobytes())
    assert viewed.hexdigest() == copied.hexdigest()
    assert image_key(image) == image_key(image.copy()) is not None
    assert image_key(image) != image_key(image.resize((64, 96)))
    assert image_key(image.convert("L")) not in (None, image_key(image))
    # no view: a palette, a transparency key, an image over one memory block
    assert image_key(image.convert("P")) is None
    keyed = image.copy()
    keyed.info["transparency"] = (0, 0, 0)
    assert image_key(keyed) is None
    hold_images_in_one_block()  # (what building a processor or loading an image does)
    assert image_key(Image.new("RGB", (3840, 2160))) is not None  # one block now
    # an image not yet decoded is decoded for its key only while small: a large one is left to
    # `load_image`, which checks the processor's pixel limit first
    for size, keyed in (((96, 64), True), ((3000, 2000), False)):
        data = io.BytesIO()
        Image.new("RGB", size, (20, 90, 160)).save(data, "JPEG")  # (PNG: getexif decodes)
        opened = Image.open(io.BytesIO(data.getvalue()))
        assert (image_key(opened) is not None) is keyed and (opened._im is not None) is keyed
    block = Image.core.get_block_size()
    Image.core.set_block_size(1 << 20)  # as Pillow's default 16 MiB holds a 4K image: blocks
    try:
        assert image_key(Image.new("RGB", (1024, 768))) is None
    finally:
        Image.core.set_block_size(block)
    assert image_key(Image.new("RGB", (0, 0))) is None and image_key(Image.new("L", (0, 5))) is None
    # pixels in the caller's buffer (`fromarray` maps L and RGBA arrays): no view, no crash
    # (Pillow's export dereferences a block list such images do not have)
    for array in (np.asarray(image.convert("L")), np.asarray(image.convert("RGBA"))):
        mapped = Image.fromarray(array)
        assert mapped.readonly and image_key(mapped) is None
    assert image_key(Image.fromarray(np.asarray(image.convert("L"))).copy()) is not None
    raw = tmp_path / "gray.ppm"  # raw pixels in a file: Pillow maps them on load
    image.convert("L").save(raw)
    assert image_key(Image.open(raw)) is None
    # an image opened lazily is decoded for its key, equal to the decoded one's
    assert image_key(Image.open(io.BytesIO(_png(image)))) == image_key(image)


def test_frame_keys_tag_in_place_and_copied_frames(photos):
    from polymodal.processors.video import frames_key

    frame = photos["astronaut"].convert("RGB").resize((56, 56))
    array = np.asarray(frame)
    keys = {
        frames_key(pair, 1 << 30)
        for pair in ([frame, frame], [array, array], [frame, array], [array, frame])
    }
    assert len(keys) == 4  # each mix of forms its own key
    assert frames_key([frame.copy(), frame.copy()], 1 << 30) == frames_key([frame, frame], 1 << 30)


def test_a_view_of_the_callers_image_is_not_kept(fresh, photos):
    """A fresh PIL image's pixels are read where Pillow holds them (no copy); the cached item
    does not keep that view, so an image changed after its request cannot feed a later hit."""
    from polymodal.processors.hashing import pixel_view

    image = photos["astronaut"].convert("RGB").resize((112, 84))
    original = image.copy()
    first = fresh.process(prompt=IMAGE, images=[image]).mm_items[0]
    view = pixel_view(image)
    assert view is not None and np.shares_memory(first.data["pixel_frames"].numpy(), view)
    image.paste((255, 0, 0), (0, 0, 50, 50))  # the caller draws on it afterwards
    again = fresh.process(prompt=IMAGE, images=[original]).mm_items[0]
    assert fresh.input_cache.hits == 1 and again.content_hash == first.content_hash
    want = torch.from_numpy(np.asarray(original)).permute(2, 0, 1)[None]
    assert torch.equal(again.data["pixel_frames"], want)


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_views_the_callers_image_and_does_not_keep_it(arch, tmp_path_factory, photos):
    """The shared MediaProcessor flow, as Qwen-VL's above: a caller's PIL image is read in place
    (its frames view Pillow's memory where the family keeps them as decoded; its key's hash is
    the content hash's, not a second one over a copy), the cached item does not keep that view,
    and a later hit gives the pixel values of the image it is asked with."""
    from polymodal.llm_core.registry import processor_class
    from polymodal.processors.hashing import pixel_view
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, arch)
    proc = processor_class(_architecture(path)).from_pretrained(path)
    image = photos["astronaut"].convert("RGB").resize((112, 84))
    original = image.copy()

    def item(picture):
        parts = [{"type": "image", "image": picture}, {"type": "text", "text": "hi"}]
        return proc.process(messages=[{"role": "user", "content": parts}]).mm_items[0]

    first = item(image)
    want = first.pixel_values().clone()
    assert np.shares_memory(first.data["pixel_frames"].numpy(), pixel_view(image))
    image.paste((255, 0, 0), (0, 0, 50, 50))  # the caller draws on it afterwards
    again = item(original)
    assert proc.input_cache.hits == 1 and again.content_hash == first.content_hash
    assert torch.equal(again.pixel_values(), want)
    changed = item(image)  # its own key: a miss, another hash
    assert proc.input_cache.hits == 1 and changed.content_hash != first.content_hash
