"""The pooling task: BERT classification against transformers, the Qwen2 outcome / process
reward models against a reference written from their public modeling code (transformers has no
class for them), batching and chunking invariance, and clear errors across tasks."""

import pytest
import torch
import transformers as tf

from polymodal import InvalidInputError
from polymodal.llm import LLM
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.pooling import PoolingParams
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint, with_pair_tokenizer

PROMPTS = [[1, 5, 17, 42, 99, 3, 2], [1, 300, 301, 2], list(range(5, 70))]


def _pool(engine, prompts, params=None, **kwargs):
    ids = [engine.add_request(p, params or PoolingParams(), **kwargs) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs.data for i in ids]


# ---- BERT -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "bert_cls")
    hf = tf.BertForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return str(path), hf


def _hf_logits(hf, ids, token_types=None):
    types = None if token_types is None else torch.tensor([token_types])
    with torch.no_grad():
        return hf(torch.tensor([ids]), token_type_ids=types).logits[0]


def test_bert_classification_matches_transformers(bert):
    path, hf = bert
    engine = Engine(path, dtype="float32", device="cpu")
    assert engine.scheduler.kv.specs == [] and engine.runner.kv_caches == [None, None]
    raw = _pool(engine, PROMPTS, PoolingParams(task="encode"))
    probs = _pool(engine, PROMPTS)
    for ids, logits, p in zip(PROMPTS, raw, probs):
        ref = _hf_logits(hf, ids)
        assert (logits - ref).abs().max() <= 1e-4
        assert (p - ref.softmax(-1)).abs().max() <= 1e-4 and abs(p.sum() - 1) < 1e-5
    # a sentence pair: segment ids 0 then 1
    pair, types = [1, 8, 9, 10, 2, 11, 12, 2], [0] * 5 + [1] * 3
    got = _pool(engine, [pair], PoolingParams(task="encode"), token_type_ids=types)[0]
    assert (got - _hf_logits(hf, pair, types)).abs().max() <= 1e-4
    assert (got - _hf_logits(hf, pair)).abs().max() > 1e-3  # the segments mattered


def test_bert_prompts_run_whole_and_alone_equals_batched(bert):
    """A bidirectional model never splits a prompt: with a budget of 70 tokens the prompts
    take separate steps, and each result equals the one-batch run."""
    path, _ = bert
    batched = _pool(Engine(path, dtype="float32", device="cpu"), PROMPTS)
    engine = Engine(path, dtype="float32", device="cpu", max_num_batched_tokens=70)
    steps = []
    for p in PROMPTS:
        engine.add_request(p, PoolingParams())
    while engine.has_unfinished():
        steps.append(len(engine.step()))
    assert steps == [2, 1]  # the 65-token prompt waited for a step of its own
    split = _pool(engine, PROMPTS)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(batched, split))
    with pytest.raises(InvalidInputError, match=r"80 tokens .* max_num_batched_tokens=70"):
        engine.add_request(list(range(5, 85)), PoolingParams())


# ---- Qwen2 reward models ------------------------------------------------------------------
def _reference(path, num_labels):
    """The public modeling code's computation: Qwen2 decoder + score MLP over every token."""
    from safetensors.torch import load_file

    from polymodal.llm_core.models.qwen2_rm import TinyRewardCheckpoint

    cfg = tf.Qwen2Config.from_pretrained(path)
    ref = TinyRewardCheckpoint(cfg, num_labels).eval()
    ref.load_state_dict(load_file(f"{path}/model.safetensors"))
    return ref, cfg


def test_outcome_reward_is_the_last_tokens_score(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_rm"))
    ref, _ = _reference(path, 1)
    rewards = _pool(Engine(path, dtype="float32", device="cpu"), PROMPTS)
    chunked = _pool(Engine(path, dtype="float32", device="cpu", max_num_batched_tokens=9), PROMPTS)
    for ids, got, got_chunked in zip(PROMPTS, rewards, chunked):
        with torch.no_grad():
            want = ref(torch.tensor([ids]))[0, -1]  # [1]
        assert got.shape == (1,) and (got - want).abs().max() <= 1e-4
        assert (got_chunked - want).abs().max() <= 1e-4  # a causal model may chunk


def test_process_reward_per_step(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_prm"))
    ref, cfg = _reference(path, 2)
    tag = cfg.step_tag_id
    prompts = [[5, 6, 7, tag, 8, 9, tag, 10, tag], [11, tag, 12, 13], list(range(20, 60)) + [tag]]
    engine = Engine(path, dtype="float32", device="cpu", max_num_batched_tokens=16)
    steps = _pool(engine, prompts)
    raw = _pool(engine, prompts, PoolingParams(task="encode"))
    for ids, got, got_raw in zip(prompts, steps, raw):
        with torch.no_grad():
            scores = ref(torch.tensor([ids]))[0]
        at_tags = scores[torch.tensor(ids) == tag]  # [num_steps, 2]
        assert got.shape == (ids.count(tag), 2)
        assert (got_raw - at_tags).abs().max() <= 1e-4
        assert (got - at_tags.softmax(-1)).abs().max() <= 1e-4
    # another step tag given per request
    other = _pool(engine, [prompts[0]], PoolingParams(step_tag_id=8))[0]
    assert other.shape == (1, 2)


# ---- errors across tasks ------------------------------------------------------------------
def test_generation_and_pooling_requests_go_to_the_right_models(tmp_path_factory, bert):
    path, _ = bert
    pooling = Engine(path, dtype="float32", device="cpu")
    with pytest.raises(InvalidInputError, match=r"pooling model \(task 'classify'\).*generate"):
        pooling.add_request([1, 2, 3], SamplingParams(max_tokens=3))
    with pytest.raises(InvalidInputError, match=r"serves the pooling task 'classify'.*'reward'"):
        pooling.add_request([1, 2, 3], PoolingParams(task="reward"))
    with pytest.raises(InvalidInputError, match="pooling task must be one of"):
        PoolingParams(task="sing")
    generator = Engine(str(tiny_checkpoint(tmp_path_factory, "qwen2")), device="cpu")
    with pytest.raises(InvalidInputError, match=r"generation model \(task 'generate'\)"):
        generator.add_request([1, 2, 3], PoolingParams())
    assert not pooling.has_unfinished() and not generator.has_unfinished()


def test_llm_pooling_methods(tmp_path_factory, bert):
    path, hf = bert
    llm = LLM(path, dtype="float32", device="cpu")
    out = llm.classify([{"prompt_token_ids": PROMPTS[0]}, PROMPTS[1]])
    assert [len(o.outputs.probs) for o in out] == [3, 3]
    ref = _hf_logits(hf, PROMPTS[1]).softmax(-1)
    assert max(abs(a - b) for a, b in zip(out[1].outputs.probs, ref.tolist())) <= 1e-4
    raw = llm.encode(PROMPTS[1])[0].outputs.data
    assert (raw - _hf_logits(hf, PROMPTS[1])).abs().max() <= 1e-4
    with pytest.raises(InvalidInputError, match="pooling model"):
        llm.generate(PROMPTS[0])
    with pytest.raises(InvalidInputError, match="not 'reward'"):
        llm.reward(PROMPTS[0])
    rm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_rm")), dtype="float32", device="cpu")
    assert rm.reward([PROMPTS[0], PROMPTS[2]])[1].outputs.data.shape == (1,)
    gen = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2")), dtype="float32", device="cpu")
    with pytest.raises(InvalidInputError, match="generation model"):
        gen.classify(PROMPTS[0])


def test_llm_score_is_the_cross_encoders_sigmoid_with_segment_ids(tmp_path_factory):
    """vLLM's `LLM.score`: pairs tokenized with segment ids, sigmoid of the one logit;
    one-to-one, one-to-many and pairwise; a classifier of several labels is refused."""
    path = with_pair_tokenizer(tiny_checkpoint(tmp_path_factory, "bert_cls", num_labels=1))
    hf = tf.BertForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", device="cpu")
    query, docs = "the cat sat", ["on the mat", "hello world", "a fox"]
    outs = llm.score(query, docs)
    assert [type(o).__name__ for o in outs] == ["ScoringRequestOutput"] * 3
    for doc, out in zip(docs, outs):
        enc = llm.tokenizer(query, text_pair=doc)
        assert out.prompt_token_ids == enc["input_ids"] and 1 in enc["token_type_ids"]
        want = _hf_logits(hf, enc["input_ids"], enc["token_type_ids"]).sigmoid()
        assert abs(out.outputs.score - float(want)) <= 1e-5
    pairwise = llm.score(docs, docs[::-1])
    assert abs(pairwise[1].outputs.score - llm.score(docs[1], docs[1])[0].outputs.score) < 1e-6
    with pytest.raises(InvalidInputError, match="text_1 has 2 texts and text_2 3"):
        llm.score(docs[:2], docs)
    with pytest.raises(InvalidInputError, match="3-label classifier, not a cross-encoder"):
        LLM(str(tiny_checkpoint(tmp_path_factory, "bert_cls")), device="cpu").score("a", "b")
