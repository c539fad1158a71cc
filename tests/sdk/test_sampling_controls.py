"""vLLM's sampling controls end to end on a tiny model: logit_bias, min_tokens,
allowed_token_ids, bad_words, prompt_logprobs, truncate_prompt_tokens, cumulative_logprob,
per-request metrics, and the same tokens with async scheduling."""

import pytest
import torch

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.request_checks import bad_words_token_ids
from tests.helpers import tiny_checkpoint

GREEDY = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", device="cpu")


def tokens(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0]


def test_logit_bias_forces_and_forbids_tokens(llm):
    base = tokens(llm, PROMPT, **GREEDY).token_ids
    forced = tokens(llm, PROMPT, **GREEDY, logit_bias={77: 100}).token_ids
    assert forced == [77] * 10 and base != forced
    avoided = tokens(llm, PROMPT, **GREEDY, logit_bias={base[0]: -100}).token_ids
    assert avoided[0] != base[0]


def test_min_tokens_holds_back_eos_then_releases_it(llm):
    eos = llm.engine.model_config.eos_token_ids[0]
    params = dict(temperature=0.0, max_tokens=20, logit_bias={eos: 100})
    assert tokens(llm, PROMPT, **params).token_ids == [eos]
    out = tokens(llm, PROMPT, **params, min_tokens=5)
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and out.finish_reason == "stop"
    assert eos not in out.token_ids[:5]


def test_allowed_token_ids_and_bad_words(llm):
    allowed = [50, 60, 70]
    out = tokens(llm, PROMPT, **{**GREEDY, "temperature": 1.0}, seed=4, allowed_token_ids=allowed)
    assert set(out.token_ids) <= set(allowed)
    base = tokens(llm, PROMPT, **GREEDY).token_ids
    as_word = lambda ids: bad_words_token_ids(llm.tokenizer, [llm.tokenizer.decode(ids)])  # noqa: E731
    # the first generated pair of tokens that is a bad word's tokenization
    at = next(i for i in range(len(base) - 1) if as_word(base[i : i + 2])[0] == base[i : i + 2])
    pair = base[at : at + 2]
    banned = tokens(llm, PROMPT, **GREEDY, bad_words=[llm.tokenizer.decode(pair)]).token_ids
    assert banned[: at + 1] == base[: at + 1]  # the same until the banned pair would complete
    assert banned[at + 1] != pair[1]
    assert all(banned[i : i + 2] != pair for i in range(len(banned) - 1))


def test_prompt_logprobs_match_transformers_also_in_chunks(ckpt, llm):
    from transformers import AutoModelForCausalLM

    ids = llm.tokenizer.encode(PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    params = SamplingParams(max_tokens=1, prompt_logprobs=2)
    chunked = Engine(ckpt, dtype="float32", device="cpu", max_num_batched_tokens=4)
    rid = chunked.add_request(ids, params)
    for out in (llm.generate(ids, params, use_tqdm=False)[0], chunked.run_until_done()[rid]):
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for pos in range(1, len(ids)):
            table = out.prompt_logprobs[pos]
            assert table[ids[pos]] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
            top2 = ref[pos - 1].topk(2).indices.tolist()
            assert set(top2) <= set(table) and len(table) <= 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate(ids, SamplingParams(**GREEDY, truncate_prompt_tokens=4), use_tqdm=False)
    assert out[0].prompt_token_ids == ids[-4:]
    assert out[0].outputs[0].token_ids == tokens(llm, ids[-4:], **GREEDY).token_ids
    # more than max_model_len can never be kept: refused naming the field, as in vLLM
    too_many = SamplingParams(**GREEDY, truncate_prompt_tokens=llm.engine.max_model_len + 1)
    with pytest.raises(InvalidInputError, match="truncate_prompt_tokens=.* max_model_len"):
        llm.generate(ids, too_many, use_tqdm=False)


def test_cumulative_logprob_and_metrics(llm):
    out = llm.generate(PROMPT, SamplingParams(**GREEDY, logprobs=1), use_tqdm=False)[0]
    seq = out.outputs[0]
    chosen = sum(table[t] for table, t in zip(seq.logprobs, seq.token_ids))
    assert seq.cumulative_logprob == pytest.approx(chosen) and seq.cumulative_logprob < 0
    assert tokens(llm, PROMPT, **GREEDY).cumulative_logprob is None  # as vLLM: not asked
    m = out.metrics
    times = [m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time]
    assert times == sorted(times) and m.finished_time >= m.last_token_time
    assert m.time_in_queue >= 0


def test_rules_give_the_same_tokens_with_async_scheduling(ckpt):
    prompts = [[5 + i, 40 + 3 * i, 90, 7 * i + 1] for i in range(6)]
    params = [
        SamplingParams(**GREEDY, logit_bias={33: 4.0}),
        SamplingParams(**GREEDY, allowed_token_ids=[10, 20, 30, 40]),
        SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6, logit_bias={2: 8.0}),
        SamplingParams(**GREEDY),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, logit_bias={12: 3.0}),
        SamplingParams(**GREEDY, bad_words=["the"]),
    ]
    results = []
    for overlap in (False, True):
        engine = Engine(ckpt, dtype="float32", device="cpu", async_scheduling=overlap)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final = engine.run_until_done()
        results.append([final[i].outputs[0].token_ids for i in ids])
    assert results[0] == results[1]
    assert len(results[0][2]) >= 6
