"""The parts of n-gram speculative decoding without an engine: the proposer's search (against
its definition by brute force) and what it refuses to draft, the accepted prefix of a checked
step, the sampler's draft rows (the target distribution kept), the config's keys and errors."""

import random

import numpy as np
import pytest
import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampler import Sampler, SamplingContext
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.speculative import SpeculativeConfig, accepted, ngram_drafts


def test_a_sampled_row_keeps_the_target_distribution():
    """Each row checking a draft yields the draft with its probability and otherwise a token
    from the rest: the row's token is distributed as the row's own distribution."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    rows = 40000
    logits = probs.log().expand(rows, -1).clone()
    params = SamplingParams(temperature=1.0)
    for draft in (0, 3):
        contexts = [SamplingContext(params, [], [], draft=draft) for _ in range(rows)]
        tokens, _ = Sampler().sample(logits, contexts)
        freq = torch.bincount(tokens, minlength=5).float() / rows
        assert (freq - probs).abs().max() < 0.012, freq
    greedy = SamplingParams(temperature=0.0)
    tokens, _ = Sampler().sample(logits[:2], [SamplingContext(greedy, [], [], draft=3)] * 2)
    assert tokens.tolist() == [0, 0]  # a greedy row is its argmax, draft or not


def _drafts(tokens, n_min, n_max, k):
    return ngram_drafts(np.asarray(tokens), n_min, n_max, k)


def _reference_drafts(tokens, n_min, n_max, k):
    """The definition, by brute force: the longest suffix found earlier, its latest place."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n :]
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_ngram_drafts():
    assert _drafts([1, 2, 3, 4, 1, 2], 2, 3, 3) == [3, 4, 1]
    assert _drafts([1, 2, 3, 1, 2, 4, 1, 2], 2, 2, 2) == [4, 1]  # the latest match
    assert _drafts([5, 1, 2, 9, 7, 1, 2, 3, 1, 2], 1, 3, 2) == [3, 1]  # the longest n
    assert _drafts([1, 2, 3, 4], 1, 2, 3) == []
    assert _drafts([7, 7], 1, 1, 4) == [7]
    assert _drafts([7], 1, 1, 4) == []
    gen = random.Random(3)
    for _ in range(3000):
        tokens = [gen.randrange(4) for _ in range(gen.randrange(1, 30))]
        n_min = gen.randrange(1, 5)
        args = (n_min, n_min + gen.randrange(4), gen.randrange(1, 6))
        assert _drafts(tokens, *args) == _reference_drafts(tokens, *args), (tokens, args)


def test_accepted_stops_at_the_first_disagreement():
    class T:
        def __init__(self, token_id):
            self.token_id = token_id

    toks = [T(5), T(6), T(9), T(1)]
    assert [t.token_id for t in accepted(toks, [5, 6, 7])] == [5, 6, 9]
    assert [t.token_id for t in accepted(toks, [5, 6, 9])] == [5, 6, 9, 1]
    assert [t.token_id for t in accepted(toks, [4, 6, 9])] == [5]


@pytest.mark.parametrize(
    "config, words",
    [
        ({"method": "mlp_speculator", "model": "x", "num_speculative_tokens": 3},
         "'mlp_speculator' is not supported.*heads polymodal does not run"),
        ({"method": "medusa", "num_speculative_tokens": 3}, "'medusa' needs 'model'"),
        ({"method": "eagle3", "num_speculative_tokens": 3}, "'eagle3' needs 'model'"),
        ({"num_speculative_tokens": 3}, "method None is not supported: 'ngram'"),
        ({"method": "draft_model", "num_speculative_tokens": 3}, "needs 'model'"),
        ({"model": "d", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
         "prompt_lookup_max: n-gram settings, but the method is 'draft_model'"),
        ({"method": "ngram"}, "num_speculative_tokens must be an int"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
         "prompt_lookup_min must be an int >= 1, got 0"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 2}, "prompt_lookup_min=4 must be <= prompt_lookup_max=2"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
         "draft_tensor_parallel_size not supported"),
        ("ngram", "must be a dict"),
        ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
         "disable_by_batch_size must be an int >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused(config, words):
    with pytest.raises(InvalidInputError, match=words):
        SpeculativeConfig.parse(config)


def test_config_defaults_as_vllm():
    k = {"method": "ngram", "num_speculative_tokens": 3}
    assert SpeculativeConfig.parse(k) == SpeculativeConfig(3, 5, 5)
    assert SpeculativeConfig.parse({**k, "prompt_lookup_max": 4}) == SpeculativeConfig(3, 4, 4)
    assert SpeculativeConfig.parse({**k, "prompt_lookup_min": 2}) == SpeculativeConfig(3, 2, 2)
    old_form = {"model": "[ngram]", "num_speculative_tokens": 2}
    assert SpeculativeConfig.parse(old_form).method == "ngram"
    # a model without a method is a draft model, as vLLM infers it
    draft = SpeculativeConfig.parse({"model": "some/draft", "num_speculative_tokens": 2})
    assert (draft.method, draft.model) == ("draft_model", "some/draft")


def test_drafts_end_before_ids_the_lm_head_cannot_produce():
    """A context may hold ids past the LM head's vocab (Mllama's image token is embedded past
    it): drafts stop before one, so no row checks a token it cannot sample."""

    class Seq:  # what the proposer reads of a request
        params = SamplingParams(max_tokens=50)
        grammar, max_model_len, num_known_tokens, num_tokens = None, 1000, 9, 9

        def __init__(self, prompt):
            self.prompt_token_ids, self.output_token_ids = prompt, [3]
            self.draft_context = None

    config = SpeculativeConfig(4, 1, 3)
    assert config.propose(Seq([1, 2, 3, 900, 5, 7, 1, 2]), 1000) == [900, 5, 7, 1]
    assert config.propose(Seq([1, 2, 3, 900, 5, 7, 1, 2]), 512) == []
    assert config.propose(Seq([1, 2, 3, 4, 900, 5, 1, 2]), 512) == [4]
