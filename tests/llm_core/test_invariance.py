"""A request's output does not depend on batch, chunk size, preemption or prefix-cache hits."""

import random

import pytest

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import run_preempted, tiny_checkpoint

rng = random.Random(0)
PROMPTS = [[rng.randrange(10, 470) for _ in range(n)] for n in range(4, 68, 4)]  # 16 prompts
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


def _engine(ckpt, **kw):
    kw.setdefault("num_kv_blocks", 256)
    return Engine(ckpt, dtype="float32", device="cpu", **kw)


def _run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def alone(ckpt):
    engine = _engine(ckpt, enable_prefix_caching=False)
    return [_run(engine, [p], GREEDY)[0] for p in PROMPTS]


def test_one_batch(ckpt, alone):
    assert _run(_engine(ckpt), PROMPTS, GREEDY) == alone


def test_chunked_prefill_budget_below_longest_prompt(ckpt, alone):
    engine = _engine(ckpt, max_num_batched_tokens=24)
    assert max(map(len, PROMPTS)) > 24
    assert _run(engine, PROMPTS, GREEDY) == alone


def test_preemption_by_tiny_block_pool(ckpt, alone):
    engine = _engine(ckpt, num_kv_blocks=12, enable_prefix_caching=False)
    assert run_preempted(engine, PROMPTS, GREEDY) == alone
    assert engine.num_free_blocks == 12


def test_prefix_cache_hit(ckpt, alone):
    engine = _engine(ckpt)
    first = _run(engine, PROMPTS, GREEDY)
    hits_before = engine.scheduler.kv.num_hit_tokens
    second = _run(engine, PROMPTS, GREEDY)
    assert engine.scheduler.kv.num_hit_tokens > hits_before
    assert first == second == alone


def test_seeded_sampling_independent_of_batch(ckpt):
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, max_tokens=10)
        for i in range(4)
    ]
    alone = [_run(_engine(ckpt), [PROMPTS[i]], params[i])[0] for i in range(4)]
    engine = _engine(ckpt, max_num_batched_tokens=32)
    noise = SamplingParams(temperature=1.0, max_tokens=10)
    ids = [engine.add_request(PROMPTS[15 - i], noise) for i in range(3)]
    ids = [engine.add_request(PROMPTS[i], params[i]) for i in (3, 1, 0, 2)] + ids
    final = engine.run_until_done()
    mixed = {i: final[r].outputs[0].token_ids for i, r in zip((3, 1, 0, 2), ids)}
    assert [mixed[i] for i in range(4)] == alone
    assert len({tuple(t) for t in alone}) == 4  # different seeds, different samples


def test_n_sequences_use_consecutive_seeds(ckpt):
    engine = _engine(ckpt)
    both = _run_n(engine, SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=6))
    first = _run(engine, [PROMPTS[3]], SamplingParams(temperature=1.0, seed=7, max_tokens=6))[0]
    second = _run(engine, [PROMPTS[3]], SamplingParams(temperature=1.0, seed=8, max_tokens=6))[0]
    assert both == [first, second]


def _run_n(engine, params):
    rid = engine.add_request(PROMPTS[3], params)
    return [o.token_ids for o in engine.run_until_done()[rid].outputs]
