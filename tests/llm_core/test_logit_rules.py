"""Per-request logit rules (allowed ids, bad words, min_tokens, logit bias, grammar bitmask)
change only the rows and tokens they name, on the logits' device."""

import pytest
import torch

from polymodal.llm_core.logit_rules import apply_logit_rules, unpack_bitmask
from polymodal.llm_core.sampler import Sampler, SamplingContext
from polymodal.llm_core.sampling_params import SamplingParams

VOCAB = 50
NEG_INF = float("-inf")


def ctx(output=(), stop_ids=(), bad_words=(), grammar=None, pending=0, **params):
    """A context; `bad_words` are token sequences (the engine tokenizes params.bad_words)."""
    if bad_words:
        params["bad_words"] = [f"word{i}" for i in range(len(bad_words))]
    if grammar is not None:
        params["structured_outputs"] = {"regex": ".*"}  # what the grammar would come from
    p = SamplingParams(**params)
    return SamplingContext(
        p, [1, 2], list(output), None, tuple(stop_ids), [list(w) for w in bad_words], grammar,
        pending,
    )  # fmt: skip


def test_each_rule_touches_only_its_row_and_tokens():
    logits = torch.randn(5, VOCAB)
    contexts = [
        ctx(),  # no rules: untouched
        ctx(allowed_token_ids=[3, 7]),
        ctx(logit_bias={4: 2.5, 9: -100.0}),
        ctx(output=[8, 11], bad_words=[[5], [11, 12], [10, 13]]),
        ctx(output=[1], stop_ids=[0, 6], min_tokens=2),
    ]
    out = apply_logit_rules(logits.clone(), contexts)
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [3, 7]
    assert torch.equal(out[1, [3, 7]], logits[1, [3, 7]])
    expected = logits[2].clone()
    expected[4] += 2.5
    expected[9] -= 100.0
    assert torch.allclose(out[2], expected)
    # [5] is always banned; [11, 12] bans 12 after 11; [10, 13] does not apply after 11
    banned = (out[3] == NEG_INF).nonzero().flatten().tolist()
    assert banned == [5, 12]
    assert (out[4] == NEG_INF).nonzero().flatten().tolist() == [0, 6]


def test_min_tokens_counts_tokens_in_flight_and_then_releases_stops():
    logits = torch.zeros(3, VOCAB)
    contexts = [
        ctx(output=[1], stop_ids=[0], min_tokens=3),  # sampling token 2 of 3: banned
        ctx(output=[1], pending=1, stop_ids=[0], min_tokens=3),  # token 3: banned
        ctx(output=[1, 2], pending=1, stop_ids=[0], min_tokens=3),  # token 4: free
    ]
    out = apply_logit_rules(logits, contexts)
    assert out[0, 0] == NEG_INF and out[1, 0] == NEG_INF and out[2, 0] == 0


class FixedGrammar:
    """A grammar stand-in that allows a fixed set of tokens."""

    def __init__(self, allowed):
        self.allowed = allowed

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0
        for t in self.allowed:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)


def test_grammar_bitmask_masks_exactly_the_disallowed_tokens():
    allowed = [0, 1, 31, 32, 33, 49]  # bit 31 is the int32 sign bit
    packed = torch.zeros(1, 2, dtype=torch.int32)
    FixedGrammar(allowed).fill_bitmask(packed, 0)
    assert unpack_bitmask(packed, VOCAB)[0].nonzero().flatten().tolist() == allowed
    logits = torch.randn(2, VOCAB)
    out = apply_logit_rules(logits.clone(), [ctx(), ctx(grammar=FixedGrammar(allowed))])
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == allowed


def test_sampler_respects_rules_for_greedy_and_random_rows_and_keeps_input():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    contexts = [
        ctx(temperature=0.0, allowed_token_ids=[2, 3]),
        ctx(temperature=1.0, allowed_token_ids=[2, 3], seed=1),
        ctx(temperature=0.0, logit_bias={17: 100.0}),
        ctx(temperature=0.0),
    ]
    for _ in range(20):
        tokens = [t.token_id for t in Sampler()(logits, contexts)]
        assert tokens[0] in (2, 3) and tokens[1] in (2, 3) and tokens[2] == 17
        assert tokens[3] == int(logits[3].argmax())
    assert torch.equal(logits, before)


@pytest.mark.gpu
def test_rules_on_cuda_equal_cpu():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    contexts = [
        ctx(allowed_token_ids=[3, 7, 40]),
        ctx(logit_bias={4: 2.5, 9: -100.0}, output=[8, 11], bad_words=[[11, 12]]),
        ctx(output=[1], stop_ids=[0, 6], min_tokens=2, grammar=FixedGrammar([0, 6, 31, 32])),
        ctx(),
    ]
    cpu = apply_logit_rules(logits.clone(), contexts)
    cuda = apply_logit_rules(logits.cuda(), contexts).cpu()
    assert torch.equal(cpu, cuda)
