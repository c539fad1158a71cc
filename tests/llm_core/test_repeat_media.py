"""A repeated image or frame list (issue 15's "again"): the encoder cache holds its tower
output, so staging leaves its pixels on the host (no upload, no resize) and the tower does not
run; the greedy tokens are the first run's. The skip is keyed by content: an array changed in
place between two requests is hashed anew, staged and encoded. If the cache drops the entry
after staging was skipped, the step stages and encodes the item after all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import LLM, SamplingParams
from polymodal.processors import types
from tests.helpers import tiny_checkpoint

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _messages(kind: str, media) -> list[dict]:
    parts = [{"type": kind, kind: media}, {"type": "text", "text": "Describe."}]
    return [{"role": "user", "content": parts}]


def _media(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "image":
        return rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)  # resized at staging
    return [Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8)) for _ in range(6)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


@pytest.fixture
def counts(monkeypatch):
    """Counts of pixel values made (`MultimodalItem.pixel_values`: the upload + resize of
    staging, idempotent re-stages not counted) and of tower calls."""
    seen = {"stage": 0, "tower": 0}
    original = types.MultimodalItem.pixel_values

    def pixel_values(self, *args, **kwargs):
        seen["stage"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(types.MultimodalItem, "pixel_values", pixel_values)
    return seen


def _run(llm, kind, media, counts) -> tuple[list[int], dict]:
    before = dict(counts)
    tokens = llm.generate(_messages(kind, media), PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    return list(tokens), {k: counts[k] - before[k] for k in counts}


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("kind", ["image", "video", "video_pieces"])
def test_a_repeat_skips_staging_and_the_tower_with_the_same_tokens(
    ckpt, counts, kind, prefix_caching
):
    """`video_pieces`: 3 temporal patches of 4 slots with 4 encoder rows a step, so the engine
    encodes (and caches) the video as 3 pieces, each under its own content hash."""
    budget = 4 if kind == "video_pieces" else None
    llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128,
              enable_prefix_caching=prefix_caching, max_num_encoder_tokens=budget)  # fmt: skip
    tower = llm.engine.runner.model.visual
    tower.register_forward_hook(lambda *_: counts.__setitem__("tower", counts["tower"] + 1))
    kind = kind.split("_")[0]
    media = _media(kind, 1)
    first, did = _run(llm, kind, media, counts)
    pieces = 3 if budget else 1
    assert did == {"stage": 1, "tower": pieces}  # the pieces slice the staged pixels
    again, did = _run(llm, kind, media, counts)
    assert again == first and did == {"stage": 0, "tower": 0}


def test_an_array_changed_in_place_is_hashed_staged_and_encoded_anew(ckpt, counts):
    llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128)
    tower = llm.engine.runner.model.visual
    tower.register_forward_hook(lambda *_: counts.__setitem__("tower", counts["tower"] + 1))
    image = _media("image", 2)
    hashes = [llm.process(_messages("image", image), stage=False).mm_items[0].content_hash]
    _run(llm, "image", image, counts)
    image[10:20, 10:20] ^= 0xFF  # the same object, new content
    hashes.append(llm.process(_messages("image", image), stage=False).mm_items[0].content_hash)
    changed, did = _run(llm, "image", image, counts)
    assert hashes[0] != hashes[1] and did == {"stage": 1, "tower": 1}
    fresh = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128)
    assert changed == _run(fresh, "image", image.copy(), counts)[0]
    frames = [np.asarray(frame).copy() for frame in _media("video", 3)]
    _run(llm, "video", frames, counts)
    frames[4][0, 0] ^= 0xFF
    assert _run(llm, "video", frames, counts)[1] == {"stage": 1, "tower": 1}


def test_an_entry_evicted_after_staging_was_skipped_is_staged_by_the_step(ckpt, counts):
    llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128,
              enable_prefix_caching=False)  # fmt: skip
    media = _media("video", 4)
    first, _ = _run(llm, "video", media, counts)
    prompt = llm.process(_messages("video", media))  # cached: left on the host
    (item,) = prompt.mm_items
    assert "pixel_frames" in item.data and counts["stage"] == 1
    llm.engine.runner.encoder_cache.entries.clear()
    llm.engine.runner.encoder_cache.sizes.clear()
    engine = llm.engine
    request_id = engine.add_request(
        prompt.token_ids, PARAMS, None, prompt.positions, prompt.mrope_delta, prompt.mm_items
    )
    outputs = engine.run_until_done()
    assert list(outputs[request_id].outputs[0].token_ids) == first
    assert counts["stage"] == 2  # by encode(), in the step
    assert torch.is_tensor(item.data.get("pixel_frames", item.data.get("pixel_values")))
