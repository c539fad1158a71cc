"""Sampler: greedy, temperature, top-k/top-p/min-p masks, penalties, statistics, seeds, logprobs."""

import math

import pytest
import torch

from polymodal.llm_core.sampler import (
    Sampler,
    SamplingContext,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from polymodal.llm_core.sampling_params import SamplingParams

VOCAB = 16


def ctx(params=None, prompt=(), output=(), device="cpu", **kw):
    """A context; seeds get their own generator, as the engine does."""
    p = params or SamplingParams(**kw)
    gen = make_generator(p.seed, device) if p.seed is not None else None
    return SamplingContext(p, list(prompt), list(output), gen)


def random_logits(rows, seed, vocab=VOCAB):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_input_is_not_modified():
    logits = random_logits(6, 0)
    before = logits.clone()
    out = Sampler()(logits, [ctx(temperature=0) for _ in range(6)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_low_temperature_and_top_k_1_give_argmax():
    logits = random_logits(8, 1)
    torch.manual_seed(0)
    cold = Sampler()(logits, [ctx(temperature=1e-3) for _ in range(8)])
    top1 = Sampler()(logits, [ctx(temperature=5.0, top_k=1) for _ in range(8)])
    assert [t.token_id for t in cold] == logits.argmax(-1).tolist()
    assert [t.token_id for t in top1] == logits.argmax(-1).tolist()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.05, 0.5, 0.15, 0.3], [0.1, 0.2, 0.3, 0.4]])
    out = apply_top_k_top_p(probs.log(), torch.tensor([4, 4, 4]), torch.tensor([0.7, 0.85, 0.3]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [
        [False, True, False, True],  # 0.5 < 0.7 -> add 0.3; mass 0.8 >= 0.7 -> stop
        [False, True, True, True],  # 0.8 < 0.85 -> add 0.15
        [False, False, False, True],  # the top token alone reaches 0.3
    ]
    assert torch.equal(out[kept], probs.log()[kept])  # survivors are unchanged


def test_top_k_keeps_k_largest_and_top_p_applies_after_renormalizing():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0], [1.0, 4.0, 3.0, 2.0, 0.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 3]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False, False]
    # Row 1: top-3 renormalized probs ~ [0.665, 0.245, 0.090]; 0.665 < 0.7 keeps the second.
    assert torch.isfinite(out[1]).tolist() == [False, True, True, False, False]


def test_min_p_masks_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    out = apply_min_p(probs.log(), torch.tensor([0.2]))  # threshold 0.1
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]


def test_sampled_tokens_respect_masks():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().repeat(4000, 1)
    torch.manual_seed(1)
    top_p = Sampler()(logits, [ctx(top_p=0.7) for _ in range(4000)])
    min_p = Sampler()(logits, [ctx(min_p=0.4) for _ in range(4000)])  # keeps >= 0.2
    # All rows with top-k take the top-k-candidates-only path; top-3 then p=0.7 keeps {1, 3}.
    both = Sampler()(logits, [ctx(top_k=3, top_p=0.7) for _ in range(4000)])
    assert {t.token_id for t in top_p} == {1, 3}
    assert {t.token_id for t in min_p} == {1, 3}
    assert {t.token_id for t in both} == {1, 3}


def reference_penalties(logits, prompt, output, rep, freq, pres):
    """Plain-Python HF repetition + OpenAI frequency/presence penalties for one row."""
    row = logits.tolist()
    for tok in set(prompt) | set(output):
        row[tok] = row[tok] / rep if row[tok] > 0 else row[tok] * rep
    for tok in set(output):
        row[tok] -= freq * output.count(tok) + pres
    return torch.tensor(row)


def test_penalties_match_reference_and_touch_only_seen_tokens():
    logits = random_logits(4, 2)
    cases = [
        ([1, 2], [3, 3, 3, 5], 1.5, 0.0, 0.0),
        ([1, 2], [3, 3, 3, 5], 1.0, 0.5, 0.0),
        ([], [3, 3, 3, 5, 9], 1.0, 0.0, -0.7),
        ([0, 15, 15], [4, 4, 7], 1.3, 0.25, 0.5),
    ]
    contexts = [
        ctx(prompt=p, output=o, repetition_penalty=r, frequency_penalty=f, presence_penalty=s)
        for p, o, r, f, s in cases
    ]
    got = apply_penalties(logits, contexts)
    for i, (p, o, r, f, s) in enumerate(cases):
        expected = reference_penalties(logits[i], p, o, r, f, s)
        torch.testing.assert_close(got[i], expected)
        untouched = [t for t in range(VOCAB) if t not in set(o) | (set(p) if r != 1.0 else set())]
        assert torch.equal(got[i, untouched], logits[i, untouched])
    # Prompt tokens are ignored by frequency/presence penalties (row 1 has only those).
    assert torch.equal(got[1, [1, 2]], logits[1, [1, 2]])


def test_penalty_moves_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    plain = Sampler()(logits, [ctx(temperature=0, output=[0])])
    penalized = Sampler()(logits, [ctx(temperature=0, output=[0], frequency_penalty=2.0)])
    assert plain[0].token_id == 0 and penalized[0].token_id == 1


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_empirical_frequencies_match_softmax(temperature):
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0, 0.5, 1.5]])
    n = 20000
    torch.manual_seed(123)
    out = Sampler()(logits.repeat(n, 1), [ctx(temperature=temperature) for _ in range(n)])
    counts = torch.bincount(torch.tensor([t.token_id for t in out]), minlength=6)
    expected = torch.softmax(logits[0] / temperature, -1)
    # Binomial std <= sqrt(0.25 / 20000) ~ 0.0035; allow ~4 sigma.
    assert (counts / n - expected).abs().max() < 0.015


def test_seeded_row_frequencies_match_softmax():
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0]])
    c = ctx(seed=7, temperature=1.0)
    tokens = [Sampler()(logits, [c])[0].token_id for _ in range(3000)]
    freq = torch.bincount(torch.tensor(tokens), minlength=4) / 3000
    assert (freq - torch.softmax(logits[0], -1)).abs().max() < 0.03


def step_logits(step):
    """The target request's logits at `step`; identical in every batch layout."""
    return random_logits(1, 1000 + step, vocab=64)[0]


def run_target(position, batch_size, seed, others_seeded, steps=20, device="cpu"):
    """Sample `steps` tokens for a seeded request at `position` among other changing rows."""
    params = SamplingParams(seed=seed, temperature=0.9, top_p=0.95, frequency_penalty=0.3)
    target = ctx(params, prompt=[1, 2, 3], device=device)
    others = []
    for j in range(batch_size - 1):
        kw = dict(temperature=[1.0, 0.0, 1.5][j % 3], top_k=[0, 5, 0][j % 3], min_p=0.05 * (j % 2))
        if others_seeded and j % 2 == 0:
            kw["seed"] = 100 + j
        others.append(ctx(SamplingParams(**kw), device=device))
    sampler = Sampler()
    out = []
    for step in range(steps):
        rows = others[:position] + [target] + others[position:]
        logits = random_logits(batch_size, step + 7 * batch_size, vocab=64)  # noise rows
        logits[position] = step_logits(step)
        torch.randn(step + position)  # also perturb the global stream differently
        tok = sampler(logits.to(device), rows)[position].token_id
        target.output_token_ids.append(tok)
        out.append(tok)
    return out


def test_seeded_request_is_independent_of_batch():
    alone = run_target(0, 1, seed=42, others_seeded=False)
    assert len(set(alone)) > 3  # really random, not argmax every step
    for position, others_seeded in [(0, True), (3, False), (7, True), (5, True)]:
        assert run_target(position, 8, seed=42, others_seeded=others_seeded) == alone
    assert run_target(2, 4, seed=43, others_seeded=True) != alone


@pytest.mark.gpu
def test_seeded_request_is_independent_of_batch_on_cuda():
    alone = run_target(0, 1, seed=42, others_seeded=False, device="cuda")
    assert run_target(6, 8, seed=42, others_seeded=True, device="cuda") == alone


def test_logprobs_are_raw_and_top_logprobs_sorted():
    logits = random_logits(3, 3)
    contexts = [
        ctx(logprobs=5, temperature=0.5, repetition_penalty=1.8, output=[1, 2], top_k=3),
        ctx(),
        ctx(logprobs=0, temperature=0),
    ]
    out = Sampler()(logits, contexts)
    raw = torch.log_softmax(logits, -1)
    assert math.isclose(out[0].logprob, raw[0, out[0].token_id].item(), rel_tol=1e-6)
    top = out[0].top_logprobs
    assert len(top) == 5 and list(top.values()) == sorted(top.values(), reverse=True)
    assert list(top) == raw[0].topk(5).indices.tolist()
    assert out[1].logprob is None and out[1].top_logprobs is None
    assert out[2].top_logprobs == {} and out[2].token_id == logits[2].argmax().item()
    assert math.isclose(out[2].logprob, raw[2].max().item(), rel_tol=1e-6)


def test_processed_logprobs_follow_the_rules_and_penalties():
    """`logprobs_mode="processed_logprobs"`: log_softmax of the logits after the masks and
    penalties, before temperature; a raw row in the same batch keeps raw logprobs."""
    logits = random_logits(2, 5)
    rules = dict(logprobs=2, suppress_tokens=[0, 3], repetition_penalty=1.5, output=[1, 4])
    contexts = [ctx(**rules, temperature=0.7, seed=3, logprobs_mode="processed_logprobs"),
                ctx(**rules, temperature=0.0)]  # fmt: skip
    out = Sampler()(logits, contexts)
    expected = apply_penalties(logits.clone(), contexts)
    expected[:, [0, 3]] = float("-inf")
    processed = torch.log_softmax(expected[0], -1)
    assert math.isclose(out[0].logprob, processed[out[0].token_id].item(), rel_tol=1e-6)
    assert list(out[0].top_logprobs) == processed.topk(2).indices.tolist()
    raw = torch.log_softmax(logits[1], -1)
    assert math.isclose(out[1].logprob, raw[out[1].token_id].item(), rel_tol=1e-6)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="len\\(contexts\\)=2"):
        Sampler()(torch.zeros(3, VOCAB), [ctx(), ctx()])
