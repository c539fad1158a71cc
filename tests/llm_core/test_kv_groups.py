"""KV-cache specs per layer: layers grouped by spec into equal groups sharing one block pool,
one block table per group, windowed groups freeing blocks as the window slides, prefix hits per
group, exact block accounting."""

import random

import pytest

from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.kv_cache_spec import (
    CHUNKED,
    FULL,
    MLA,
    NONE,
    SLIDING,
    KVCacheSpec,
    plan_layout,
)
from polymodal.llm_core.request import Request
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.scheduler import Scheduler

FULL_SPEC = KVCacheSpec(FULL, None, 2, 16)


def _sliding(window):
    return KVCacheSpec(SLIDING, window, 2, 16)


def _gemma3_specs(num_layers, window=1024):
    """Five sliding-window layers, then a global one (Gemma 3's pattern)."""
    return [FULL_SPEC if i % 6 == 5 else _sliding(window) for i in range(num_layers)]


def test_one_spec_is_one_group_of_every_layer():
    layout = plan_layout([FULL_SPEC] * 28)
    assert layout.num_groups == 1 and layout.slots == 28
    assert layout.layer_slot == [(0, i) for i in range(28)]  # today's: a tensor per layer


def test_gemma3_12b_pattern_groups_of_the_global_layer_count():
    layout = plan_layout(_gemma3_specs(48))  # 40 sliding, 8 global layers
    assert layout.slots == 8 and layout.num_groups == 6
    assert [g.spec.kind for g in layout.groups] == [SLIDING] * 5 + [FULL]
    assert layout.groups[5].layers == [5, 11, 17, 23, 29, 35, 41, 47]
    slots = [s for s in layout.layer_slot]
    assert len(set(slots)) == 48 and all(s is not None for s in slots)


def test_uneven_counts_pad_or_fall_back_to_the_gcd():
    layout = plan_layout(_gemma3_specs(62))  # Gemma 3 27B: 10 global, 52 sliding
    assert layout.slots == 10 and layout.num_groups == 7  # 8 padding slots (11%)
    layout = plan_layout([FULL_SPEC] * 3 + [_sliding(8)] * 7)  # padding 2 of 9 > 15%
    assert layout.slots == 1 and layout.num_groups == 10  # gcd(3, 7) = 1


def test_layers_without_kv_and_mismatched_pages():
    none = KVCacheSpec(NONE)
    layout = plan_layout([FULL_SPEC, none, FULL_SPEC])
    assert layout.layer_slot == [(0, 0), None, (0, 1)]
    assert plan_layout([none, none]).slots == 0
    with pytest.raises(NotImplementedError, match="page shapes"):
        plan_layout([FULL_SPEC, KVCacheSpec(SLIDING, 8, 2, 32)])


def test_one_group_may_mix_page_shapes():
    """DeciLM's layers differ in kv heads (and skip attention): one block table, each layer its
    own tensor shape; a block id holds one page of each."""
    specs = [KVCacheSpec(FULL, None, 8, 16), KVCacheSpec(NONE), KVCacheSpec(FULL, None, 1, 16),
             KVCacheSpec(FULL, None, 2, 16)]  # fmt: skip
    layout = plan_layout(specs)
    assert layout.num_groups == 1 and layout.slots == 3
    assert layout.layer_slot == [(0, 0), None, (0, 1), (0, 2)]
    assert [layout.cache_shape(s, 10, 4) for s in range(3)] == [
        (2, 10, 4, 8, 16), (2, 10, 4, 1, 16), (2, 10, 4, 2, 16)
    ]  # fmt: skip
    assert layout.block_elements(4) == 4 * 2 * 16 * (8 + 1 + 2)
    assert layout.token_elements(0) == 2 * 16 * 11


def test_mla_latent_cache_is_one_plane_of_one_vector_per_token():
    spec = KVCacheSpec(MLA, None, 1, 512 + 64)  # DeepSeek-V3: kv_lora_rank + qk_rope_head_dim
    layout = plan_layout([spec] * 3)
    assert spec.planes == 1 and not spec.is_windowed and spec.first_needed(1000) == 0
    assert layout.num_groups == 1 and layout.cache_shape(0, 7, 16) == (1, 7, 16, 1, 576)
    assert layout.token_elements(0) == 3 * 576  # (rank + rope) x layers per token


def _req(tokens, rid="r", max_tokens=8):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=params)


def _run(kv, req, n):
    assert kv.allocate_slots(req, n)
    req.num_computed_tokens += n
    kv.cache_full_blocks(req)


def test_window_blocks_are_freed_as_the_window_slides():
    kv = KVCacheManager(12, block_size=4, specs=[_sliding(6), FULL_SPEC])
    assert kv.null_block == 0 and kv.num_free_blocks == 11  # block 0 is the null block
    req = _req(range(20))
    _run(kv, req, 8)  # positions 0-7: two blocks in each group
    assert req.block_tables == [[1, 2], [3, 4]]
    _run(kv, req, 4)  # the query at 8 sees keys 3..8: block 0 (positions 0-3) still needed
    assert req.block_tables == [[1, 2, 5], [3, 4, 6]]
    _run(kv, req, 1)  # at 12 it sees 7..12: the window group frees positions 0-3
    assert req.block_tables == [[0, 2, 5, 7], [3, 4, 6, 8]]
    _run(kv, req, 3)  # at 16 it sees 11..16: positions 4-7 go too
    assert req.block_tables == [[0, 0, 5, 7], [3, 4, 6, 8]]
    assert kv.num_held_blocks(req) == [2, 4] and kv.num_free_blocks == 11 - 6
    kv.free_request(req)
    assert kv.num_free_blocks == 11 and all(b.ref_count == 0 for b in kv.blocks)


def test_a_long_chunk_never_allocates_what_its_first_query_cannot_see():
    """A prefix hit then a chunk far past the window: a windowed group holds null entries
    for the blocks before its first new query's window."""
    kv = KVCacheManager(32, block_size=4, specs=[KVCacheSpec(CHUNKED, 8, 2, 16), FULL_SPEC])
    a = _req(range(40))
    _run(kv, a, 24)
    b = _req(list(range(24)) + [99] * 8, "b")
    hits = kv.get_computed_blocks(b)
    # 6 blocks hit; the chunked group's next query (position 24) sees its chunk [24, 32) only
    assert hits == [[0] * 6, a.block_tables[1][:6]]
    assert kv.allocate_slots(b, 8, hits)
    assert b.num_computed_tokens == 24 and b.block_tables[0][:6] == [0] * 6
    assert all(x != 0 for x in b.block_tables[0][6:]) and len(b.block_tables[0]) == 8


def test_prefix_hits_need_the_window_blocks_of_every_group():
    kv = KVCacheManager(40, block_size=4, specs=[_sliding(6), FULL_SPEC])
    a = _req(range(30))
    for n in (8, 8, 8):
        _run(kv, a, n)
    b = _req(list(range(24)) + [77, 78], "b")
    hits = kv.get_computed_blocks(b)
    # the window group's blocks before the window of position 24 (keys 19..) were freed
    # (and stay cached); 6 full blocks in both groups
    assert [len(h) for h in hits] == [6, 6] and hits[1] == a.block_tables[1][:6]
    assert hits[0][:4] == [0] * 4 and hits[0][4:] == a.block_tables[0][4:6]
    # evict the window group's block 5 (positions 20-23): the hit shrinks to where every
    # group can serve it
    evicted = a.block_tables[0][5]
    kv.free_request(a)
    kv.cached.pop((0, a.block_hashes[5]))
    kv.blocks[evicted].block_hash = None
    hits = kv.get_computed_blocks(b)
    assert [len(h) for h in hits] == [5, 5]


def test_gemma3_32k_request_holds_the_window_not_the_prompt():
    """A 32k-token request on Gemma 3's pattern (window 1024, 5 local : 1 global), prefilled in
    chunks then decoding: the KV it holds per layer, on average, stays within
    (5 x 1024 + 32k) / 6 tokens, plus at most one partly used block per local group."""
    layout = plan_layout(_gemma3_specs(48))
    block_size, prompt = 16, 32 * 1024 - 8
    num_blocks = 1 + layout.blocks_per_request(32 * 1024, block_size, 2048)
    kv = KVCacheManager(num_blocks, block_size, specs=[g.spec for g in layout.groups])
    sched = Scheduler(kv, max_num_batched_tokens=2048)
    req = _req([7] * prompt, max_tokens=8)
    sched.add(req)
    peak = 0
    while len(req.output_token_ids) < 8:
        out = sched.schedule()  # blocks for this step allocated, out-of-window ones freed
        assert out.requests == [req] and not out.preempted
        held = kv.num_held_blocks(req)
        tokens = sum(h * block_size * len(g.layers) for h, g in zip(held, layout.groups))
        peak = max(peak, tokens / 48)
        context = req.num_computed_tokens + out.num_new_tokens[0]  # KV after this step
        if req.num_computed_tokens >= prompt:  # decoding: the steady state
            bound = (5 * 1024 + context) / 6 + block_size
            assert tokens / 48 <= bound, (tokens / 48, bound)
        sched.update(out)
        if req.num_pending:  # caught up: its token is "sampled"
            req.num_pending -= 1
            req.output_token_ids.append(7)
    assert req.num_computed_tokens == prompt + 7
    # during prefill a local layer also holds the chunk being computed
    assert peak <= (5 * (1024 + 2048) + 32 * 1024) / 6 + block_size
    sched.finish(req, "stop")
    assert kv.num_free_blocks == num_blocks - 1


@pytest.mark.parametrize(
    "specs,num_blocks", [([_sliding(12), FULL_SPEC], 48), ([KVCacheSpec(CHUNKED, 8, 2, 16)], 14)]
)
def test_no_leaked_blocks_after_1000_random_requests(specs, num_blocks):
    """Scheduler + manager alone (tokens faked): finishing, aborted and preempted requests
    across KV groups, prefix hits included; every block returns, every ref count is 0."""
    rng = random.Random(3)
    kv = KVCacheManager(num_blocks, block_size=4, specs=specs)
    sched = Scheduler(kv, max_num_batched_tokens=32, max_num_seqs=12)
    start, live, submitted = kv.num_free_blocks, [], 0
    prefixes = [[rng.randrange(100) for _ in range(12)] for _ in range(4)]
    while submitted < 1000 or sched.has_unfinished():
        for _ in range(rng.randrange(0, 4)):
            if submitted < 1000:
                prompt = rng.choice(prefixes)[: rng.randrange(1, 12)]
                prompt += [rng.randrange(100) for _ in range(rng.randrange(1, 30))]
                req = _req(prompt, f"r{submitted}", max_tokens=rng.randrange(1, 20))
                sched.add(req)
                live.append(req)
                submitted += 1
        if live and rng.random() < 0.1:
            sched.finish(live.pop(rng.randrange(len(live))), "abort")
        out = sched.schedule()
        sched.update(out)
        for req in out.requests:
            if req.num_pending and not req.is_finished:  # caught up: a token is "sampled"
                req.num_pending -= 1
                req.output_token_ids.append(rng.randrange(100))
                if len(req.output_token_ids) >= req.params.max_tokens:
                    sched.finish(req, "length")
                    live.remove(req)
    assert sched.num_preemptions > 0, "the pool was meant to force preemptions"
    assert kv.num_hit_tokens > 0, "the shared prefixes were meant to hit the cache"
    assert kv.num_free_blocks == start
    assert all(b.ref_count == 0 for b in kv.blocks)
