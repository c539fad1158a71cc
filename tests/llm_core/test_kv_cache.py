"""Block pool bookkeeping: exact block ids, ref counts, prefix hits, eviction order, no leaks."""

import random

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.request import Request
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint


def _req(tokens, rid="r"):
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams())


def _fill(kv, req, n):
    assert kv.allocate_slots(req, n)
    req.num_computed_tokens += n
    kv.cache_full_blocks(req)


def test_allocation_block_ids_and_refusal():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = _req(range(9))
    _fill(kv, a, 9)  # 3 blocks
    assert a.block_ids == [0, 1, 2]
    assert kv.num_free_blocks == 1
    b = _req(range(100, 108), "b")
    assert not kv.allocate_slots(b, 8)  # needs 2 blocks, 1 free: refused, nothing changes
    assert b.block_ids == [] and kv.num_free_blocks == 1


def test_prefix_hit_shares_full_blocks_and_keeps_last_token_to_run():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req(range(10))
    _fill(kv, a, 10)
    b = _req(list(range(8)) + [77, 78], "b")
    hits = kv.get_computed_blocks(b)
    assert hits == [a.block_ids[:2]]  # one list per KV group
    assert kv.allocate_slots(b, 2, hits)
    assert b.num_computed_tokens == 8 and kv.blocks[a.block_ids[0]].ref_count == 2
    # an identical 8-token prompt may reuse only one block: its last token must run
    c = _req(range(8), "c")
    assert kv.get_computed_blocks(c) == [a.block_ids[:1]]


def test_freed_blocks_stay_cached_and_evict_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = _req(range(6))
    _fill(kv, a, 6)  # blocks 0,1,2 full and hashed
    kv.free_request(a)
    assert kv.num_free_blocks == 4
    # hashed blocks come back in LRU order with the tail (block 2) evicted first
    assert list(kv.free) == [3, 2, 1, 0]
    again = _req(range(6), "again")
    assert kv.get_computed_blocks(again) == [[0, 1]]
    b = _req(range(50, 54), "b")
    assert kv.allocate_slots(b, 4)
    assert b.block_ids == [3, 2]  # the never-hashed block first, then the tail block
    assert kv.get_computed_blocks(_req(range(6), "x")) == [[0, 1]]


def test_media_hash_separates_identical_placeholder_tokens():
    from polymodal.processors.types import MultimodalItem

    kv = KVCacheManager(num_blocks=16, block_size=4)

    def with_image(content_hash, rid):
        r = _req([1, 9, 9, 9, 9, 9, 9, 9, 9, 2, 3], rid)
        r.mm_items = [MultimodalItem("image", {}, 1, 8, content_hash)]
        return r

    a = with_image("img-A", "a")
    _fill(kv, a, 11)
    assert kv.get_computed_blocks(with_image("img-B", "b")) == []
    assert kv.get_computed_blocks(with_image("img-A", "c")) == [a.block_ids[:2]]


def test_no_block_leaks_after_1000_random_requests(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama")
    engine = Engine(
        str(path),
        dtype="float32",
        device="cpu",
        num_kv_blocks=16,
        max_num_batched_tokens=64,
        max_num_seqs=48,
    )
    start = engine.num_free_blocks
    rng = random.Random(1)
    live: list[str] = []
    submitted = 0
    while submitted < 1000 or engine.has_unfinished():
        for _ in range(rng.randrange(0, 12)):
            if submitted == 1000:
                break
            prompt = [rng.randrange(5, 400) for _ in range(rng.randrange(1, 40))]
            params = SamplingParams(
                temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randrange(1, 40), ignore_eos=True
            )
            live.append(engine.add_request(prompt, params))
            submitted += 1
        if live and rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemptions"
    assert engine.num_free_blocks == start
    assert all(b.ref_count == 0 for b in engine.scheduler.kv.blocks)
