"""Whisper's timestamp rules in the sampler (`llm_core/timestamp_rules.py`) vs transformers'
`WhisperTimeStampLogitsProcessor`, on random logits and output histories that reach every
branch (first token, a pair, a closing timestamp, text after text, forced timestamps), in a
batch with rows that have no rules; and the engine's greedy tokens under the rules."""

import random

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.logit_rules import apply_logit_rules
from polymodal.llm_core.sampler import SamplingContext
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.timestamp_rules import TimestampRules

VOCAB, EOS, NO_TS = 120, 50, 69  # timestamps: 70 ... 119
RULES = TimestampRules(
    no_timestamps_token_id=NO_TS, eos_token_id=EOS, max_initial_timestamp_index=5
)
PROMPT = [60, 61, 62]  # the decoder prompt: begin_index = 3


def _histories() -> list[list[int]]:
    rng = random.Random(0)
    fixed = [[], [70], [72, 10], [72, 10, 80], [72, 10, 80, 80], [72, 10, 80, 85, 11, 12]]
    drawn = [[rng.choice([rng.randrange(EOS), rng.randrange(70, VOCAB)]) for _ in range(n)]
             for n in (2, 3, 5, 8) for _ in range(4)]  # fmt: skip
    return fixed + drawn


def _reference(logits: torch.Tensor, history: list[int]) -> torch.Tensor:
    config = GenerationConfig(no_timestamps_token_id=NO_TS, eos_token_id=EOS,
                              max_initial_timestamp_index=5)  # fmt: skip
    processor = WhisperTimeStampLogitsProcessor(config, begin_index=len(PROMPT))
    return processor(torch.tensor([PROMPT + history]), logits[None].clone())[0]


def test_rules_match_transformers_row_by_row_in_one_batch():
    torch.manual_seed(0)
    histories = _histories()
    logits = torch.randn(len(histories) + 1, VOCAB) * 3
    logits[::3, 70:] += 2.0  # some rows where the timestamps' total mass wins
    params = SamplingParams(timestamp_rules=RULES, temperature=0.0)
    contexts = [SamplingContext(params, PROMPT, h) for h in histories]
    contexts.append(SamplingContext(SamplingParams(), PROMPT, [1, 2]))  # no rules: untouched
    got = apply_logit_rules(logits.clone(), contexts)
    forced = 0
    for i, history in enumerate(histories):
        want = _reference(logits[i], history)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"history {history}"
        torch.testing.assert_close(got[i][~torch.isinf(got[i])], want[~torch.isinf(want)])
        forced += bool(torch.isinf(want[:70]).all() and history and history[-1] < 70)
    assert forced > 0  # the probability rule fired somewhere
    assert torch.equal(got[-1], logits[-1])


def test_rules_turn_host_tokens_on_and_check_the_vocab():
    params = SamplingParams(timestamp_rules=RULES)
    assert params.has_logit_rules and params.needs_host_tokens
    from polymodal.llm_core.request_checks import check_request

    check_request([1, 2], params, 64, VOCAB)
    with pytest.raises(InvalidInputError, match="timestamp_rules"):
        check_request([1, 2], params, 64, 60)
