"""How a request's raw media bytes are read and keyed: the processed-input cache's BLAKE3 key
of bytes, a data: URL or a file (one thread for small inputs, the pool for large ones: the same
digest), and a data: URL decoded once for the key and the loader together."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from polymodal.processors.input_cache import raw_media_key
from polymodal.processors.qwen_vl import QwenVLProcessor

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.resize((320, 240)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [50_000, 5 << 20])  # one thread / the thread pool
def test_raw_keys_are_the_bytes_blake3_however_they_come(tmp_path, size):
    """A small input (a 448 px JPEG) is hashed on one thread, a large one on every core: the
    same digest as plain BLAKE3 of the bytes, given as bytes, a data: URL or a file."""
    import blake3

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    want = blake3.blake3(data).hexdigest()
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    assert raw_media_key(data) == raw_media_key(url) == raw_media_key(str(path)) == want
    assert raw_media_key(str(tmp_path / "missing.jpg")) is None


def test_a_data_url_is_decoded_once_a_request(our_processors, photos, monkeypatch):
    """The cache key's read and the loader's read of one data: URL share one base64 decode;
    another request with the same bytes decodes its own URL, and a cache hit decodes once."""
    from polymodal.processors import media

    shared = our_processors["qwen2_5_vl"]
    fresh = QwenVLProcessor(shared.tokenizer, shared.config)  # a cache of its own
    url = "data:image/jpeg;base64," + base64.b64encode(_jpeg(photos["astronaut"])).decode()
    calls = []
    real = media.base64.b64decode
    monkeypatch.setattr(media.base64, "b64decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = fresh.process(prompt=IMAGE, images=[url])
    assert len(calls) == 1
    again = fresh.process(prompt=IMAGE, images=["" + url[:10] + url[10:]])  # another object
    assert len(calls) == 2 and fresh.input_cache.hits == 1
    assert again.token_ids == first.token_ids
    assert again.mm_items[0].content_hash == first.mm_items[0].content_hash
    with pytest.raises(Exception, match="malformed base64"):
        media.read_source_bytes("data:image/png;base64,abc")  # a bad one still names itself
