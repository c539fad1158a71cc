"""A request's media items preprocessed side by side (`item_pool.run_items`): the same prompt,
items and errors as one after another, for Qwen-VL (images + video) and the shared
MediaProcessor flow; results in order, the first failing item's error, no deadlock when
nested."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest
import torch

from polymodal.llm_core.errors import MediaError
from polymodal.processors import base, item_pool, qwen_vl
from polymodal.processors.item_pool import THREAD_PREFIX, run_items
from polymodal.processors.qwen_vl import QwenVLProcessor

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _one_by_one(jobs):
    return [job() for job in jobs]


def _jpeg(image, size) -> bytes:
    buffer = io.BytesIO()
    image.resize(size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _assert_same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.positions == b.positions
    assert a.mrope_delta == b.mrope_delta and len(a.mm_items) == len(b.mm_items)
    for x, y in zip(a.mm_items, b.mm_items):
        assert (x.modality, x.content_hash, x.slot_start, x.num_slots) == (
            y.modality, y.content_hash, y.slot_start, y.num_slots
        )  # fmt: skip
        assert x.data.keys() == y.data.keys()
        assert all(torch.equal(x.data[k], y.data[k]) for k in x.data)


def test_results_in_order_on_the_pool_threads():
    names = []

    def job(i):
        names.append(threading.current_thread().name)
        time.sleep(0.01 * (5 - i))  # later jobs end first
        return i

    assert run_items([lambda i=i: job(i) for i in range(5)]) == [0, 1, 2, 3, 4]
    assert all(name.startswith(THREAD_PREFIX) for name in names)
    assert run_items([lambda: threading.current_thread().name]) == [
        threading.current_thread().name
    ]  # one job runs inline


def test_the_first_failing_job_in_order_raises_after_all_ended():
    ended = []

    def slow_fail():
        time.sleep(0.05)
        ended.append("slow")
        raise ValueError("job 1")

    def fast_fail():
        ended.append("fast")
        raise ValueError("job 2")

    def late():
        time.sleep(0.1)
        ended.append("late")

    with pytest.raises(ValueError, match="job 1"):
        run_items([lambda: 0, slow_fail, fast_fail, late])
    assert sorted(ended) == ["fast", "late", "slow"]


def test_nested_calls_run_inline_without_deadlock():
    """More outer jobs than workers, each running inner jobs: inner ones run inline."""
    inner = lambda: run_items([lambda: threading.current_thread().name] * 3)  # noqa: E731
    outs = run_items([inner] * 32)
    assert all(len(set(names)) == 1 for names in outs)


@pytest.fixture()
def qwen(our_processors):
    shared = our_processors["qwen2_5_vl"]
    return QwenVLProcessor(shared.tokenizer, shared.config, processed_cache_mb=0)


def test_qwen_items_side_by_side_equal_one_by_one(qwen, photos, video_file, tmp_path, monkeypatch):
    path = tmp_path / "coffee.jpg"
    path.write_bytes(_jpeg(photos["coffee"], (300, 200)))
    request = dict(
        prompt=f"{IMAGE} and {IMAGE} then {VIDEO}, last {IMAGE}",
        images=[_jpeg(photos["astronaut"], (320, 240)), path, photos["hopper"]],
        videos=[video_file],
        num_frames=6,
    )
    side_by_side = qwen.process(**request)
    monkeypatch.setattr(qwen_vl, "run_items", _one_by_one)
    _assert_same(side_by_side, qwen.process(**request))


def test_a_bad_item_raises_what_one_by_one_raises(qwen, photos, monkeypatch):
    good = _jpeg(photos["astronaut"], (320, 240))
    request = dict(prompt=IMAGE * 3, images=[good, b"not an image", b"\xff\xd8\xff cut"])
    with pytest.raises(MediaError) as side_by_side:
        qwen.process(**request)
    monkeypatch.setattr(qwen_vl, "run_items", _one_by_one)
    with pytest.raises(MediaError) as one_by_one:
        qwen.process(**request)
    # (PIL's message names its buffer object by address)
    strip = lambda error: re.sub(r" at 0x[0-9a-f]+", "", str(error.value))  # noqa: E731
    assert strip(side_by_side) == strip(one_by_one)
    assert str(one_by_one.value).startswith("image 2")


def test_media_processor_items_side_by_side_equal_one_by_one(tmp_path_factory, photos, monkeypatch):
    from polymodal.processors.gemma3 import Gemma3Processor
    from tests.helpers import tiny_checkpoint

    proc = Gemma3Processor.from_pretrained(
        tiny_checkpoint(tmp_path_factory, "gemma3_vl"), processed_cache_mb=0
    )
    parts = [{"type": "image", "image": _jpeg(photos[name], (200, 150))}
             for name in ("astronaut", "coffee", "chelsea")]  # fmt: skip
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare."}]}]
    side_by_side = proc.process(messages=messages)
    assert item_pool._POOL is not None
    monkeypatch.setattr(base, "run_items", _one_by_one)
    _assert_same(side_by_side, proc.process(messages=messages))
