"""Multimodal invariants: chunking inside an image, encoder-cache hits, media-aware prefix cache."""

import numpy as np
import pytest
from PIL import Image

from polymodal import LLM, SamplingParams
from polymodal.pipeline import Pipeline
from tests.helpers import tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _image(seed, w=224, h=168):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompt(image, text="What is this?"):
    parts = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


def _llm(ckpt, **kw):
    return LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128, **kw)


def test_chunk_budget_smaller_than_one_image(ckpt):
    ref = _llm(ckpt).generate(_prompt(_image(0)), GREEDY)[0].outputs[0].token_ids
    llm = _llm(ckpt, max_num_batched_tokens=7)
    slots = llm.process(_prompt(_image(0))).mm_items[0].num_slots
    assert slots > 7 * 2  # the image's slots span at least three steps
    assert llm.generate(_prompt(_image(0)), GREEDY)[0].outputs[0].token_ids == ref


def test_encoder_cache_hit_gives_same_output(ckpt):
    llm = _llm(ckpt, enable_prefix_caching=False)
    first = llm.generate(_prompt(_image(1)), GREEDY)[0].outputs[0].token_ids
    cache = llm.engine.runner.encoder_cache
    hits = cache.hits
    second = llm.generate(_prompt(_image(1), "Describe it."), GREEDY)[0].outputs[0].token_ids
    assert cache.hits > hits
    fresh = _llm(ckpt).generate(_prompt(_image(1), "Describe it."), GREEDY)[0].outputs[0]
    assert second == fresh.token_ids and len(first) == 8


def test_prefix_cache_separates_different_images_of_same_size(ckpt):
    llm = _llm(ckpt)
    kv = llm.engine.scheduler.kv
    llm.generate(_prompt(_image(2)), GREEDY)
    before = kv.num_hit_tokens
    other = llm.generate(_prompt(_image(3)), GREEDY)[0].outputs[0].token_ids
    # only the system-prompt blocks before the image may be shared
    image_start = llm.process(_prompt(_image(3))).mm_items[0].slot_start
    assert kv.num_hit_tokens - before <= image_start
    assert other == _llm(ckpt).generate(_prompt(_image(3)), GREEDY)[0].outputs[0].token_ids
    before = kv.num_hit_tokens
    llm.generate(_prompt(_image(2)), GREEDY)
    assert kv.num_hit_tokens - before > image_start + 16  # blocks inside the image reused


def test_bad_media_fails_alone_and_good_request_completes(ckpt, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a JPEG header and nothing else
    pipe = Pipeline(ckpt, dtype="float32", device="cpu", num_kv_blocks=128)
    good = {"image": _image(4), "text": "Describe."}
    alone = pipe(**good, max_tokens=8, temperature=0.0, ignore_eos=True)
    results = pipe(
        [{"image": str(bad), "text": "Describe."}, good],
        max_tokens=8,
        temperature=0.0,
        ignore_eos=True,
    )
    assert results[0].error and "broken.jpg" in results[0].error
    assert results[1].error is None and results[1].token_ids == alone.token_ids


def test_async_scheduling_same_tokens(ckpt):
    prompts = [_prompt(_image(s)) for s in (10, 11, 12)] + [_prompt(_image(10), "Again?")]
    sync = [o.outputs[0].token_ids for o in _llm(ckpt).generate(prompts, GREEDY)]
    outs = _llm(ckpt, async_scheduling=True, max_num_batched_tokens=40).generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == sync
