"""`LLM.beam_search` finds transformers' beams (`generate(num_beams=...)`) with its scores."""

import pytest
import torch

from polymodal import LLM, BeamSearchParams, InvalidInputError, SamplingParams
from tests.helpers import tiny_checkpoint

PROMPTS = ["The quick brown fox", "Numbers 0 1 2", "Hello, how are you today?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


def hf_beams(ckpt, ids, width, max_tokens, length_penalty):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    out = model.generate(
        torch.tensor([ids]),
        num_beams=width,
        num_return_sequences=width,
        max_new_tokens=max_tokens,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    beams = []
    for seq in out.sequences.tolist():
        gen = seq[len(ids) :]
        end = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
        beams.append(gen[:end])  # transformers pads after EOS
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize("width, max_tokens, length_penalty", [(3, 6, 1.0), (4, 5, 0.5)])
def test_beams_and_scores_equal_transformers(ckpt, width, max_tokens, length_penalty):
    llm = LLM(ckpt, dtype="float32", device="cpu")
    tok = llm.tokenizer
    params = BeamSearchParams(
        beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty
    )
    outputs = llm.beam_search([{"prompt_token_ids": tok.encode(p)} for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outputs):
        ids = tok.encode(prompt)
        ref_beams, ref_scores = hf_beams(ckpt, ids, width, max_tokens, length_penalty)
        ours = [seq.tokens[len(ids) :] for seq in out.sequences]
        assert ours == ref_beams, prompt
        assert [s.score for s in out.sequences] == pytest.approx(ref_scores, abs=1e-4)
        for seq in out.sequences:
            chosen = [table[t] for table, t in zip(seq.logprobs, seq.tokens[len(ids) :])]
            assert seq.cum_logprob == pytest.approx(sum(chosen), abs=1e-5)
            assert seq.text == tok.decode(seq.tokens, skip_special_tokens=True)
    assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_blocks


def test_eos_ends_beams_as_transformers_does(ckpt, tmp_path_factory):
    # make a token the model writes early its EOS, so some beams finish before max_tokens
    llm = LLM(ckpt, dtype="float32", device="cpu")
    ids = llm.tokenizer.encode(PROMPTS[0])
    greedy = llm.generate(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eos = greedy[0].outputs[0].token_ids[2]
    eos_ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2", eos_token_id=eos))
    llm = LLM(eos_ckpt, dtype="float32", device="cpu")
    assert llm.engine.model_config.eos_token_ids == [eos]
    out = llm.beam_search([ids], BeamSearchParams(beam_width=4, max_tokens=8))[0]
    ref_beams, ref_scores = hf_beams(eos_ckpt, ids, 4, 8, 1.0)
    assert [seq.tokens[len(ids) :] for seq in out.sequences] == ref_beams
    assert [s.score for s in out.sequences] == pytest.approx(ref_scores, abs=1e-4)
    stopped = [seq for seq in out.sequences if seq.finish_reason == "stop"]
    assert stopped and all(seq.tokens[-1] == eos == seq.stop_reason for seq in stopped)
    assert any(len(seq.tokens) - len(ids) < 8 for seq in stopped)


def test_bad_beam_params_name_the_field():
    with pytest.raises(InvalidInputError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)
    with pytest.raises(InvalidInputError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(InvalidInputError, match="best_of"):
        BeamSearchParams(beam_width=2, max_tokens=4, best_of=3)
