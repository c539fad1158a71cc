"""The cross-attention KV kind: layout (cross groups last, sized by encoder rows), the block
manager (a request's encoder-row table allocated whole with its first blocks, flagged until
written, never grown, never prefix-cached; text-only requests hold none), exact block
accounting through preemption and aborts, and the scheduler booking a request's encoder work
in its first step."""

import pytest

from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.kv_cache_spec import CROSS, FULL, KVCacheSpec, kv_spec_of, plan_layout
from polymodal.llm_core.request import Request
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.scheduler import Scheduler
from polymodal.processors.types import CROSS_ATTENTION, MultimodalItem

FULL_SPEC = KVCacheSpec(FULL, None, 2, 16)
CROSS_SPEC = KVCacheSpec(CROSS, None, 2, 16, max_rows=40)


def _item(rows, key="img", slot=0):
    return MultimodalItem("image", {}, slot, 1, key, target=CROSS_ATTENTION, encoder_rows=rows)


def _req(tokens, rid="r", items=(), max_tokens=8):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(tokens), params, mm_items=list(items))


def _run(kv, req, n):
    assert kv.allocate_slots(req, n)
    req.num_computed_tokens += n
    req.cross_pending = False  # the step was launched: its rows are written
    kv.cache_full_blocks(req)


def test_cross_spec_from_the_attention_spec():
    attn = AttentionSpec(4, 2, 16, 0.25, Mask.CROSS, encoder_rows=1500)
    spec = kv_spec_of(attn)
    assert spec == KVCacheSpec(CROSS, None, 2, 16, max_rows=1500)
    assert spec.is_cross and not spec.is_windowed and not attn.is_causal
    assert spec.max_blocks(10, 16, 4) == spec.max_blocks(10_000, 16, 512) == 94  # rows, not tokens
    with pytest.raises(ValueError, match="encoder_rows"):
        AttentionSpec(4, 2, 16, 0.25, Mask.CROSS)


def test_cross_groups_come_after_the_token_groups():
    """Mllama's pattern: a cross layer every fifth layer, the first at 3."""
    specs = [CROSS_SPEC if i % 5 == 3 else FULL_SPEC for i in range(20)]
    layout = plan_layout(specs)
    assert layout.slots == 4 and layout.num_groups == 5 and layout.num_cross_groups == 1
    assert [g.spec.kind for g in layout.groups] == [FULL] * 4 + [CROSS]
    assert layout.groups[4].layers == [3, 8, 13, 18]
    # a request of 33 tokens: 3 blocks per token group, 40 encoder rows = 3 blocks
    assert layout.blocks_per_request(33, 16, 512) == 4 * 3 + 3
    # Whisper: every decoder layer has a self and a cross attention
    layout = plan_layout([FULL_SPEC, CROSS_SPEC] * 4)
    assert layout.num_groups == 2 and layout.groups[1].layers == [1, 3, 5, 7]


def test_encoder_rows_are_allocated_once_with_the_first_blocks():
    kv = KVCacheManager(20, block_size=4, specs=[FULL_SPEC, CROSS_SPEC])
    req = _req(range(6), items=[_item(10)])
    assert req.num_encoder_rows == 10
    assert kv.allocate_slots(req, 3)  # a first chunk of 3 tokens
    assert req.block_tables == [[0], [1, 2, 3]] and req.cross_pending
    req.num_computed_tokens = 3
    req.cross_pending = False
    assert kv.allocate_slots(req, 3)  # more tokens: token blocks grow, the cross table does not
    assert req.block_tables == [[0, 4], [1, 2, 3]] and not req.cross_pending
    assert kv.num_held_blocks(req) == [2, 3]
    kv.free_request(req)
    assert kv.num_free_blocks == 20 and req.block_tables == []


def test_text_only_requests_hold_no_cross_blocks():
    kv = KVCacheManager(20, block_size=4, specs=[FULL_SPEC, CROSS_SPEC])
    req = _req(range(9))
    _run(kv, req, 9)
    assert req.block_tables == [[0, 1, 2], []] and not req.cross_pending
    kv.free_request(req)
    assert kv.num_free_blocks == 20


def test_allocation_fails_whole_when_the_rows_do_not_fit():
    kv = KVCacheManager(4, block_size=4, specs=[FULL_SPEC, CROSS_SPEC])
    req = _req(range(4), items=[_item(13)])  # 1 token block + 4 row blocks > 4
    assert not kv.allocate_slots(req, 4)
    assert kv.num_free_blocks == 4 and not req.cross_pending
    assert all(not table for table in req.block_tables)


def test_prefix_hits_share_token_blocks_never_cross_blocks_and_depend_on_the_media():
    kv = KVCacheManager(40, block_size=4, specs=[FULL_SPEC, CROSS_SPEC])
    a = _req(range(10), "a", [_item(6, "cat")])
    _run(kv, a, 10)
    b = _req(list(range(8)) + [50, 51], "b", [_item(6, "cat")])
    hits = kv.get_computed_blocks(b)
    assert hits == [a.block_tables[0][:2], []]  # two full token blocks; rows are per request
    assert kv.allocate_slots(b, 2, hits)
    assert b.num_computed_tokens == 8 and b.cross_pending
    assert set(b.block_tables[1]).isdisjoint(a.block_tables[1]) and len(b.block_tables[1]) == 2
    # the same tokens with another image (every token reads it) or none: no hit
    assert kv.get_computed_blocks(_req(range(10), "c", [_item(6, "dog")])) == []
    assert kv.get_computed_blocks(_req(range(10), "d")) == []


def test_preemption_frees_and_rewrites_the_rows():
    kv = KVCacheManager(9, block_size=4, specs=[FULL_SPEC, CROSS_SPEC])
    sched = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4)
    a = _req(range(7), "a", [_item(8, "x")], max_tokens=20)
    b = _req(range(7), "b", [_item(8, "y")], max_tokens=20)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.requests == [a, b] and a.cross_pending and b.cross_pending
    sched.update(out)
    assert not a.cross_pending
    preempted = []
    for _ in range(12):  # decode until the pool runs dry and b is preempted
        for req in list(sched.running):
            req.output_token_ids.append(1)
            req.num_pending -= 1
        out = sched.schedule()
        preempted += out.preempted
        sched.update(out)
        if preempted:
            break
    assert preempted == [b] and b.block_tables == [] and not b.cross_pending
    sched.finish(a, "stop")
    out = sched.schedule()  # b comes back: new cross blocks, written again
    assert out.requests == [b] and b.cross_pending and len(b.block_tables[1]) == 2
    sched.finish(b, "abort")
    assert kv.num_free_blocks == 9


def test_scheduler_books_cross_items_in_the_first_step_only():
    kv = KVCacheManager(64, block_size=4, specs=[FULL_SPEC, CROSS_SPEC])
    sched = Scheduler(kv, 16, 4, max_num_encoder_tokens=10)
    a = _req(range(6), "a", [_item(8, "x", slot=5)])
    b = _req(range(20), "b", [_item(8, "y", slot=15)])
    c = _req(range(6), "c", [_item(8, "z", slot=5)])
    for req in (a, b, c):
        sched.add(req)
    out = sched.schedule()  # b's 8 rows would overflow the step's encoder budget: it waits
    assert out.requests == [a] and a.cross_pending
    sched.update(out)
    out = sched.schedule()
    # b's rows are encoded in its first chunk, though its placeholder comes after it
    assert out.requests == [a, b] and out.num_new_tokens == [1, 15] and b.cross_pending
    sched.update(out)
    out = sched.schedule()  # b's second chunk books nothing: c's rows fit
    assert out.requests == [a, b, c] and out.num_new_tokens == [1, 5, 6]
    assert c.cross_pending and not b.cross_pending
