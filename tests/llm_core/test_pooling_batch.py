"""The fast pooling path (issue 16): `Engine.add_requests` of a batch, the whole-prompt step of
an encoder-only model (one copy of the ids, one gather of the pooled rows), and pooling steps
read back a step late with async scheduling. Every result must equal the one-at-a-time path."""

import pytest
import torch
import transformers as tf

from polymodal import InvalidInputError
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.pooling import (
    Pooler,
    PoolingInput,
    PoolingParams,
    PromptRows,
    pool_rows,
    pooled_rows,
)
from polymodal.llm_core.pooling_step import admit_pooling, runs_whole_prompts
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint

PROMPTS = [[1, 5, 17, 42, 99, 3, 2], [1, 300, 301, 2], list(range(5, 70)), [7]]
PAIR, PAIR_TYPES = [1, 8, 9, 10, 2, 11, 12, 2], [0] * 5 + [1] * 3


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "bert_cls"))


def _each(engine, prompts, params=None, types=None):
    types = types or [None] * len(prompts)
    ids = [
        engine.add_request(p, params or PoolingParams(), token_type_ids=t)
        for p, t in zip(prompts, types)
    ]
    final = engine.run_until_done()
    return [final[i].outputs.data for i in ids]


def _batch(engine, prompts, params=None, types=None):
    ids = engine.add_requests(prompts, params or PoolingParams(), token_type_ids=types)
    final = engine.run_until_done()
    return [final[i].outputs.data for i in ids]


def test_add_requests_equals_add_request_and_transformers(bert):
    engine = Engine(bert, dtype="float32", device="cpu")
    hf = tf.BertForSequenceClassification.from_pretrained(bert, dtype=torch.float32).eval()
    prompts, types = [*PROMPTS, PAIR], [None] * len(PROMPTS) + [PAIR_TYPES]
    params = PoolingParams(task="encode")
    each = _each(engine, prompts, params, types)
    batch = _batch(engine, prompts, params, types)
    for ids, segments, a, b in zip(prompts, types, each, batch):
        assert torch.equal(a, b)
        with torch.no_grad():
            seg = None if segments is None else torch.tensor([segments])
            ref = hf(torch.tensor([ids]), token_type_ids=seg).logits[0]
        assert (b - ref).abs().max() <= 1e-4
    # add_request's and add_requests' prompts in one step: ids from lists and from tensors
    first = engine.add_request(PROMPTS[0], params)
    rest = engine.add_requests(PROMPTS[1:], params)
    final = engine.run_until_done()
    assert all(torch.equal(final[i].outputs.data, e) for i, e in zip([first, *rest], each))
    assert final[rest[0]].prompt_token_ids == PROMPTS[1]


def test_add_requests_checks_every_prompt_before_queueing_any(bert):
    engine = Engine(bert, dtype="float32", device="cpu", max_num_batched_tokens=70)
    vocab = engine.model_config.vocab_size
    bad = [
        ([[1, 2], []], r"prompt 1: the prompt is empty"),
        ([[1, 2], [3], [4, vocab]], rf"prompt 2: prompt token ids \[{vocab}\] are outside"),
        ([[1, 2], [-1]], r"prompt 1: prompt token ids \[-1\] are outside"),
        ([list(range(5, 85))], r"prompt 0: the prompt has 80 tokens .* max_num_batched"),
    ]
    for prompts, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            engine.add_requests(prompts, PoolingParams())
        assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()
    with pytest.raises(InvalidInputError, match=r"prompt 0: token_type_ids has 1 entries"):
        engine.add_requests([[1, 2]], PoolingParams(), token_type_ids=[[0]])
    with pytest.raises(InvalidInputError, match=r"token_type_ids has 2 entries for 1 prompts"):
        engine.add_requests([[1, 2]], PoolingParams(), token_type_ids=[None, None])
    # truncation happens before the checks, per prompt
    cut = engine.add_requests([list(range(5, 85))], PoolingParams(truncate_prompt_tokens=60))
    assert engine.run_until_done()[cut[0]].prompt_token_ids == list(range(5, 65))


def test_add_requests_to_a_generation_model(tmp_path_factory):
    engine = Engine(str(tiny_checkpoint(tmp_path_factory, "llama")), device="cpu")
    params = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(InvalidInputError, match=r"prompt 1: "):
        engine.add_requests([[1, 2, 3], []], params)
    assert not engine.has_unfinished()  # the first prompt was aborted again
    ids = engine.add_requests([[1, 2, 3], [4, 5]], params)
    final = engine.run_until_done()
    assert [len(final[i].outputs[0].token_ids) for i in ids] == [3, 3]


def test_encoder_steps_take_the_whole_prompt_path(bert):
    engine = Engine(bert, dtype="float32", device="cpu")
    engine.add_requests(PROMPTS, PoolingParams())
    admit_pooling(engine)  # the prompts the step may admit, as requests
    sched = engine.scheduler.schedule()
    assert runs_whole_prompts(engine.runner, sched)
    assert all(r.prompt_tensor is not None for r in sched.requests)


@pytest.mark.parametrize("pooler", [Pooler.CLS, Pooler.LAST, Pooler.MEAN, Pooler.ALL])
def test_prompt_rows_pool_like_a_list_of_rows(pooler):
    lens = [3, 1, 5]
    flat = torch.randn(sum(lens), 4)
    starts = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    rows = PromptRows(flat, starts, lens)
    plain = list(flat.split(lens))
    assert all(torch.equal(a, b) for a, b in zip(rows, plain))
    if pooler is Pooler.ALL:
        return
    prompts = [PoolingInput([1] * n, PoolingParams()) for n in lens]
    ref = torch.stack([pool_rows(pooler, h, []) for h in plain])
    assert torch.equal(pooled_rows(pooler, rows, prompts), ref)
    assert torch.equal(pooled_rows(pooler, plain, prompts), ref)


def test_async_pooling_reads_each_step_back_one_step_late(bert):
    """With async scheduling a pooling step's outputs come with the next step's call; the
    results are those of the synchronous engine, and a request aborted while its step is in
    flight is dropped."""
    sync = _each(Engine(bert, dtype="float32", device="cpu"), PROMPTS)
    engine = Engine(
        bert, dtype="float32", device="cpu", async_scheduling=True, max_num_batched_tokens=70
    )
    assert engine.async_scheduling
    ids = engine.add_requests(PROMPTS, PoolingParams())
    per_step = []
    while engine.has_unfinished():
        per_step.append([out.request_id for out in engine.step()])
    # steps: [7, 4 tokens] (65 more do not fit 70) then [65, 1]; each read back a call late
    assert per_step == [[], ids[:2], ids[2:]]
    got = _batch(engine, PROMPTS)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, sync))  # other steps
    ids = engine.add_requests(PROMPTS, PoolingParams())
    assert engine.step() == []  # the first step is in flight
    engine.abort(ids[0])
    outs = engine.run_until_done()
    assert sorted(outs) == sorted(ids[1:]) and not engine.scheduler.has_unfinished()


def test_finish_all_keeps_the_others_running_in_order(bert):
    engine = Engine(bert, dtype="float32", device="cpu")
    engine.add_requests(PROMPTS, PoolingParams())
    admit_pooling(engine)
    reqs = engine.scheduler.schedule().requests
    assert engine.scheduler.running == reqs
    engine.scheduler.finish_all([reqs[2], reqs[0], reqs[2]], "stop")
    assert engine.scheduler.running == [reqs[1], reqs[3]]
    assert [r.is_finished for r in reqs] == [True, False, True, False]
    assert reqs[0].finish_reason == "stop"


def test_queued_prompts_become_requests_step_by_step(bert):
    """`add_requests` queues checked prompts; each step builds only the requests it may admit
    (here 2 a step), a queued prompt can be aborted, and the caller changing its lists after
    the add changes nothing."""
    engine = Engine(bert, dtype="float32", device="cpu", max_num_seqs=2)
    expected = _each(engine, PROMPTS)
    prompts = [list(p) for p in PROMPTS]
    ids = engine.add_requests(prompts, PoolingParams())
    prompts[0][1] = prompts[2][0] = 0  # the engine has its own copy
    assert engine.has_unfinished() and not engine.scheduler.waiting
    assert engine.num_waiting == 4
    with pytest.raises(InvalidInputError, match="already in use"):
        engine.add_request([1, 2], PoolingParams(), request_id=ids[3])
    first = {out.request_id: out for out in engine.step()}  # synchronous on the CPU
    assert sorted(first) == ids[:2]
    assert len(engine._pooling) == 2 and engine.num_waiting == 2  # two built and run
    engine.abort(ids[2])
    engine.abort(ids[2])  # unknown now: ignored
    assert ids[2] not in engine._pooling and engine.num_waiting == 1
    final = {**first, **engine.run_until_done()}
    assert sorted(final) == sorted(ids[:2] + ids[3:])
    for i in (0, 1, 3):
        assert torch.allclose(final[ids[i]].outputs.data, expected[i], atol=1e-6)  # other steps
        assert final[ids[i]].prompt_token_ids == PROMPTS[i]
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()


def test_add_requests_rejects_ids_that_are_not_ints(bert):
    engine = Engine(bert, dtype="float32", device="cpu")
    with pytest.raises(InvalidInputError, match=r"prompt 1: prompt token ids must be integers"):
        engine.add_requests([[1, 2], [3, 4.5]], PoolingParams())
    with pytest.raises(InvalidInputError, match=r"prompt 1: prompt token ids \[-3\] are outside"):
        engine.add_requests([(1, 2), (3, -3)], PoolingParams())  # tuples: converted alike
    assert not engine.has_unfinished()
    ids = engine.add_requests([(1, 5, 17), range(3, 9)], PoolingParams())
    final = engine.run_until_done()
    assert [final[i].prompt_token_ids for i in ids] == [[1, 5, 17], list(range(3, 9))]
