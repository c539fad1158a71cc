"""The scheduler's media rules (exact chunk boundaries): atomic spans are never cut, a prefix
hit never ends inside one, encoder rows are budgeted per step; the encoder cache is bounded in
bytes; items' embed masks and runs."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.encoder_cache import EncoderCache
from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.request import Request
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.scheduler import Scheduler
from polymodal.processors.types import MultimodalItem


def _item(start, length, key, mask=None):
    mask = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    return MultimodalItem("image", {}, start, length, key, embed_mask=mask)


def _req(n_tokens, items, atomic=True, rid="r"):
    spans = [(it.slot_start, it.slot_end) for it in items] if atomic else []
    params = SamplingParams(max_tokens=4)
    return Request(rid, list(range(n_tokens)), params, mm_items=items, atomic_spans=spans)


def _chunks(sched, steps=20):
    """Run the scheduler alone (no model): each step's (start, n) for every request."""
    seen = []
    for _ in range(steps):
        out = sched.schedule()
        if not out:
            break
        pairs = zip(out.requests, out.num_new_tokens)
        seen.append([(r.request_id, r.num_computed_tokens, n) for r, n in pairs])
        for r, n in zip(out.requests, out.num_new_tokens):
            r.num_computed_tokens += n
            sched.kv.cache_full_blocks(r)
            if r.num_computed_tokens >= len(r.prompt_token_ids):
                sched.finish(r, "stop")
    return seen


def test_atomic_span_is_never_cut():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(kv, max_num_batched_tokens=10)
    sched.add(_req(30, [_item(6, 8, "a"), _item(16, 4, "b")]))
    # budget 10: [0, 6) stops before the image [6, 14); then [6, 16) holds it whole; then
    # [16, 26) holds the second image [16, 20); the rest
    assert _chunks(sched) == [[("r", 0, 6)], [("r", 6, 10)], [("r", 16, 10)], [("r", 26, 4)]]


def test_without_atomic_spans_chunks_fill_the_budget():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(kv, max_num_batched_tokens=10)
    sched.add(_req(30, [_item(6, 8, "a")], atomic=False))
    assert _chunks(sched) == [[("r", 0, 10)], [("r", 10, 10)], [("r", 20, 10)]]


def test_encoder_budget_defers_the_second_item_and_always_admits_the_first():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    cache = EncoderCache()
    sched = Scheduler(kv, 100, max_num_encoder_tokens=6, encoder_cache=cache)
    # both items need encoding: 8 rows (over the budget, but the step's first) then 5 more
    sched.add(_req(40, [_item(2, 8, "a"), _item(12, 5, "b")], atomic=False))
    out = sched.schedule()
    assert out.num_new_tokens == [12]  # stops before item b
    out.requests[0].num_computed_tokens += 12
    cache.put("a", torch.zeros(8, 2))
    out = sched.schedule()
    assert out.num_new_tokens == [28]  # b is the step's first encoding now


def test_same_image_in_two_requests_is_booked_once():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(kv, 100, max_num_encoder_tokens=8)
    sched.add(_req(12, [_item(1, 8, "same")], rid="a"))
    sched.add(_req(12, [_item(1, 8, "same")], rid="b"))
    sched.add(_req(12, [_item(1, 8, "other")], rid="c"))
    out = sched.schedule()
    # a and b share one encoding; c runs its text up to its image, which waits a step
    assert [r.request_id for r in out.requests] == ["a", "b", "c"]
    assert out.num_new_tokens == [12, 12, 1]


def test_prefix_hit_never_ends_inside_an_atomic_span():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(kv, 100)
    first = _req(24, [_item(6, 8, "img")], rid="a")
    sched.add(first)
    _chunks(sched)
    # the same prompt: 5 full blocks cached (20 tokens) would end inside [6, 14) if the
    # image ended later; here the hit [0, 20) covers the image whole
    second = _req(24, [_item(6, 8, "img")], rid="b")
    sched.add(second)
    out = sched.schedule()
    assert out.num_new_tokens == [4] and second.num_computed_tokens == 20
    # an image ending after the hit: [10, 22) is cut at 10 -> the hit is 2 blocks (8 tokens)
    sched.finish(second, "stop")
    third = _req(24, [_item(10, 12, "img")], rid="c")
    fourth = _req(24, [_item(10, 12, "img")], rid="d")
    sched.add(third)
    _chunks(sched)
    sched.add(fourth)
    out = sched.schedule()
    assert fourth.num_computed_tokens == 8 and out.num_new_tokens == [16]


def test_encoder_cache_is_bounded_in_bytes():
    cache = EncoderCache(max_bytes=3 * 4 * 10)  # three [10] fp32 tensors
    for key in "abcd":
        cache.put(key, torch.zeros(10))
    assert list(cache.entries) == ["b", "c", "d"] and cache.num_bytes == 120
    assert cache.get("b") is not None  # b is now the most recent
    cache.put("e", torch.zeros(20))  # 80 bytes: c and d go
    assert list(cache.entries) == ["b", "e"] and cache.evictions == 3
    cache.put("huge", torch.zeros(100))  # larger than the cache: kept alone
    assert list(cache.entries) == ["huge"] and "huge" in cache


def test_embed_rows_and_runs():
    item = _item(10, 8, "x", mask=[0, 1, 1, 0, 1, 1, 1, 0])
    assert item.num_embeds == 5
    assert item.embed_runs() == [(11, 13), (14, 17)]
    assert item.embed_rows(0, 8) == ([1, 2, 4, 5, 6], 0, 5)
    assert item.embed_rows(3, 6) == ([4, 5], 2, 4)
    plain = _item(0, 4, "y")
    assert plain.embed_runs() == [(0, 4)] and plain.embed_rows(1, 3) == ([1, 2], 1, 3)


@pytest.mark.parametrize("budget", [3, 7])
def test_engine_refuses_an_atomic_span_over_the_budget(tmp_path_factory, budget):
    from polymodal.llm_core.errors import InvalidInputError
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "gemma3_vl")
    from polymodal.llm_core.engine import Engine

    engine = Engine(str(path), device="cpu", num_kv_blocks=16, max_num_batched_tokens=budget)
    item = _item(2, 8, "k")
    with pytest.raises(InvalidInputError, match="max_num_batched_tokens is"):
        engine.add_request(list(range(12)), SamplingParams(max_tokens=1), mm_items=[item])
