"""The host tier under the prefix cache (`kv_offloading_size`, vLLM's native KV offloading):
blocks the device pool evicts are kept in host memory and copied back on a later hit, giving
the outputs (and logprobs) of computing the prefix again; its slots are reused least recently
used first; what it does not do is refused naming it."""

import pytest
import torch

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.kv_offload import HostKVTier
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
FIRST = [(5 * j) % 400 + 30 for j in range(45)]
OTHERS = [[(7 * i + 3 * j) % 400 + 30 for j in range(45)] for i in range(1, 6)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


def _engine(ckpt, **kw):
    kw.setdefault("num_kv_blocks", 24)
    return Engine(ckpt, dtype="float32", device="cpu", block_size=4, **kw)


def _one(engine, prompt):
    rid = engine.add_request(prompt, PARAMS)
    return engine.run_until_done()[rid].outputs[0]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_evicted_prefix_comes_back_from_host_memory(ckpt, async_scheduling):
    """24 device blocks of 4 tokens hold one 45-token prompt at a time: the other prompts
    evict the first one's blocks, which the host tier keeps; the first prompt again is served
    from it (its 11 full blocks; the 45th token runs) with the same outputs."""
    fresh = _one(_engine(ckpt), FIRST)
    engine = _engine(ckpt, kv_offloading_size=0.01, async_scheduling=async_scheduling)
    kv, host = engine.scheduler.kv, engine.scheduler.kv.host
    assert _one(engine, FIRST).token_ids == fresh.token_ids
    for prompt in OTHERS:
        _one(engine, prompt)
    assert host.num_saved >= 11 and not any(k in kv.cached for k in list(host.slots)[:11])
    hits = kv.num_hit_tokens
    again = _one(engine, FIRST)
    assert kv.num_hit_tokens - hits == 44 and host.num_loaded == 11
    assert again.token_ids == fresh.token_ids
    for got, want in zip(again.logprobs, fresh.logprobs):
        assert got.keys() == want.keys()
        for token in got:
            assert abs(got[token] - want[token]) < 1e-5
    assert engine.num_free_blocks == 24


def test_preempted_requests_come_back_through_the_tier(ckpt):
    """A pool too small for the batch preempts; a preempted request's blocks are evicted while
    it waits (and kept in host memory) and its recompute reads them back: the outputs of a
    pool that never preempts."""
    from tests.helpers import run_preempted

    prompts = [FIRST, *OTHERS[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    roomy = _engine(ckpt, num_kv_blocks=256)
    ids = [roomy.add_request(p, params) for p in prompts]
    final = roomy.run_until_done()
    want = [final[i].outputs[0].token_ids for i in ids]
    small = _engine(ckpt, num_kv_blocks=26, kv_offloading_size=0.01, max_num_seqs=4)
    assert run_preempted(small, prompts, params) == want
    host = small.scheduler.kv.host
    assert host.num_saved > 0 and host.num_loaded > 0 and small.num_free_blocks == 26


def test_without_the_tier_the_prefix_is_computed_again(ckpt):
    engine = _engine(ckpt)
    _one(engine, FIRST)
    for prompt in OTHERS:
        _one(engine, prompt)
    hits = engine.scheduler.kv.num_hit_tokens
    _one(engine, FIRST)
    assert engine.scheduler.kv.num_hit_tokens == hits  # the contrast of the test above


def test_a_drafter_pages_travel_too(ckpt):
    """A draft model's pages at the same block ids are saved and loaded with the target's:
    its drafts after a host hit are the target's own tokens again (it is its own draft)."""
    spec = {"method": "draft_model", "model": ckpt, "num_speculative_tokens": 3}
    engine = _engine(ckpt, kv_offloading_size=0.01, speculative_config=spec)
    host = engine.scheduler.kv.host
    assert len(host.tensors) == 4  # two layers of each model, a slot tensor each
    first = _one(engine, FIRST)
    for prompt in OTHERS:
        _one(engine, prompt)
    assert _one(engine, FIRST).token_ids == first.token_ids and host.num_loaded > 0
    spec = engine.speculation
    assert spec.num_accepted_tokens >= 0.9 * spec.num_draft_tokens > 0


def test_host_slots_are_reused_least_recently_used_first():
    device = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2, 1, 1)
    tier = HostKVTier([device], 2)
    tier.save(0, "a")
    tier.save(1, "b")
    tier.save(0, "a")  # known: nothing copied, "a" now the most recently used
    assert tier.lookup("b") == 1 and tier.lookup("a") == 0  # "b" then "a" used: "b" oldest
    tier.save(2, "c")  # takes "b"'s slot
    assert tier.lookup("b") is None and tier.lookup("c") == 1 and tier.num_saved == 3
    tier.load(1, 5)  # block 2's content (as "c") into block 5, after the saves, in order
    tier.run_pending()
    assert torch.equal(device[:, 5], device[:, 2]) and torch.equal(tier.host[0][0], device[:, 0])
    tier.reset()
    assert tier.lookup("a") is None and tier.free == [1, 0]


def _copy_one_by_one(tensors, host, ops):
    """The queued copies one block and one tensor at a time (what the batches must equal)."""
    for save, block_id, slot in ops:
        for device, pages in zip(tensors, host):
            if save:
                pages[slot] = device[:, block_id]
            else:
                device[:, block_id] = pages[slot]


@pytest.mark.parametrize("seed", range(4))
def test_batched_copies_equal_copying_block_by_block(seed):
    """Saves and loads in any order (slots consecutive or not, a slot saved twice, a load
    right after the save of its slot, a block saved after a load into it) leave the device
    pool and the host slots as copying each block on its own, in order, does."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(2, 12, 2, 3, 4, generator=gen) for _ in range(2)]
    tier = HostKVTier([t.clone() for t in tensors], 8)
    ops = []
    for _ in range(40):
        save = bool(torch.randint(0, 3, (1,), generator=gen)) or not ops
        block, slot = (int(torch.randint(0, n, (1,), generator=gen)) for n in (12, 8))
        slot = ops[-1][2] + 1 if ops and slot % 2 and ops[-1][2] < 7 else slot  # runs
        ops.append((save, block, slot))
    want_device = [t.clone() for t in tensors]
    want_host = [h.clone() for h in tier.host]
    _copy_one_by_one(want_device, want_host, ops)
    tier.pending = list(ops)
    tier.run_pending()
    assert all(torch.equal(a, b) for a, b in zip(tier.tensors, want_device))
    assert all(torch.equal(a, b) for a, b in zip(tier.host, want_host))


def test_copies_batch_by_kind_and_run():
    """Saves to consecutive slots are one batch and one copy; a second copy to a block or a
    slot, or the other kind, starts a new batch."""
    from polymodal.llm_core.kv_offload import _batches, _runs

    saves = [(True, b, s) for b, s in zip([7, 3, 9, 1], [0, 1, 2, 3])]
    assert list(_batches(saves)) == [(True, [7, 3, 9, 1], [0, 1, 2, 3])]
    assert list(_runs([0, 1, 2, 3])) == [(0, 4, 0)]
    assert list(_runs([4, 5, 1, 2, 6])) == [(0, 2, 4), (2, 4, 1), (4, 5, 6)]
    ops = [(False, 2, 0), (False, 2, 1), (False, 3, 2), (True, 4, 1), (True, 5, 1)]
    assert [(k, b) for k, b, _ in _batches(ops)] == [
        (False, [2]),
        (False, [2, 3]),
        (True, [4]),
        (True, [5]),
    ]


@pytest.mark.parametrize(
    "arch, kw, words",
    [
        ("qwen2", {"kv_offloading_backend": "lmcache"}, "only 'native'"),
        ("qwen2", {"kv_offloading_size": 0}, "must be > 0 GiB, got 0"),
        (
            "qwen2",
            {"kv_offloading_size": None, "kv_offloading_backend": "native"},
            "needs kv_offloading_size",
        ),
        ("qwen2", {"enable_prefix_caching": False}, "the prefix cache, which is off"),
        ("gemma3", {}, r"\['full', 'sliding'\] layers; only one full-attention group"),
        ("bert_cls", {}, "the prefix cache, which is off"),
    ],
)
def test_what_it_does_not_do_is_refused(tmp_path_factory, arch, kw, words):
    kw = {"kv_offloading_size": 0.01, **kw}
    with pytest.raises(InvalidInputError, match=words):
        _engine(str(tiny_checkpoint(tmp_path_factory, arch)), **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_graphs(tmp_path_factory):
    """On the GPU (pinned host slots, asynchronous copies on the step's stream, decode and
    prefill graphs): the evicted prefix comes back with the outputs of computing it again."""
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2"))

    def engine(**kw):
        return Engine(path, dtype="float32", device="cuda", block_size=4, num_kv_blocks=24, **kw)

    fresh = _one(engine(), FIRST)
    tiered = engine(kv_offloading_size=0.01)
    host = tiered.scheduler.kv.host
    assert host.host[0].is_pinned() and tiered.runner.graphs is not None
    _one(tiered, FIRST)
    for prompt in OTHERS:
        _one(tiered, prompt)
    again = _one(tiered, FIRST)
    assert host.num_loaded == 11 and again.token_ids == fresh.token_ids
