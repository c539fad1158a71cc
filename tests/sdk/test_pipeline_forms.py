"""Pipeline takes transformers' image-text-to-text call forms (same tokens as the native form),
returns every `n`, and fetches http(s) media only with `allow_http=True`."""

import functools
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from polymodal import InvalidInputError, MediaError, Pipeline
from tests.helpers import tiny_checkpoint

NATIVE = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
HF_STYLE = dict(max_new_tokens=8, do_sample=False, ignore_eos=True)


def _image(seed=1, w=84, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline(ckpt, dtype="float32", device="cpu", num_kv_blocks=128)


def test_transformers_call_forms_give_the_native_tokens(pipe, tmp_path):
    img = _image()
    path = tmp_path / "cat.png"
    img.save(path)
    native = pipe(image=img, text="Describe.", **NATIVE).token_ids
    assert pipe(images=img, text="Describe.", **HF_STYLE).token_ids == native
    assert pipe(images=[img], text="Describe.", **HF_STYLE).token_ids == native
    assert pipe(str(path), text="Describe.", **HF_STYLE).token_ids == native
    assert pipe(img, text="Describe.", generate_kwargs=HF_STYLE).token_ids == native
    for part in ({"type": "image", "image": img}, {"type": "image", "url": str(path)}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}]
        assert pipe(text=messages, **HF_STYLE).token_ids == native
        assert pipe(messages, **HF_STYLE).token_ids == native


def test_every_completion_is_returned(pipe):
    sampled = dict(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    result = pipe(image=_image(), text="Describe.", n=3, **sampled)
    assert len(result.outputs) == 3 and len(result.texts) == 3
    assert result.text == result.texts[0] and result.token_ids == result.outputs[0].token_ids
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    assert result.usage.completion_tokens == 18
    hf = pipe(image=_image(), text="Describe.", num_return_sequences=3, **sampled)
    assert hf.texts == result.texts


def test_conflicting_or_unknown_keywords_are_named(pipe):
    with pytest.raises(InvalidInputError, match="max_new_tokens= or max_tokens="):
        pipe(text="hi", max_new_tokens=3, max_tokens=4)
    with pytest.raises(InvalidInputError, match="do_sample=False"):
        pipe(text="hi", do_sample=False, temperature=0.7)
    with pytest.raises(InvalidInputError, match="num_beams"):
        pipe(text="hi", num_beams=3)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_allow_http_fetches_media_only_when_asked(ckpt, pipe, tmp_path):
    _image(7).save(tmp_path / "remote.png")
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/remote.png"
    try:
        with pytest.raises(MediaError, match="allow_http=True"):
            pipe(image=url, text="Describe.", **NATIVE)
        fetching = Pipeline(ckpt, allow_http=True, dtype="float32", device="cpu")
        remote = fetching(image=url, text="Describe.", **NATIVE)
        local = fetching(image=_image(7), text="Describe.", **NATIVE)
        assert remote.token_ids == local.token_ids
    finally:
        server.shutdown()
