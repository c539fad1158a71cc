"""The fused MoE Triton kernels against the dense per-expert reference, on CPU under
TRITON_INTERPRET=1 (set up in `interpreted.py`): random routing with experts that receive no
tokens, batches smaller than the expert count, the one-token GEMV path and the sort/pad step."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.layers import triton_moe
from polymodal.llm_core.layers.moe import experts_reference
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


def make_experts(num_experts, hidden, inter, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5).to(dtype)
    return gate_up, down


def make_routing(num_tokens, num_experts, top_k, seed=0, allowed=None):
    """Distinct random experts per token (from `allowed` when given) and positive weights."""
    gen = torch.Generator().manual_seed(seed + 1)
    pool = torch.arange(num_experts) if allowed is None else torch.tensor(allowed)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]]
                       for _ in range(num_tokens)])  # fmt: skip
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return weights, ids


CASES = {  # name: (tokens, experts, top_k, experts allowed to be chosen)
    "one_token": (1, 8, 2, None),
    "fewer_tokens_than_experts": (3, 8, 2, None),
    "idle_experts": (21, 8, 3, [1, 2, 6]),  # five experts get no token
    "many_tokens": (37, 6, 2, None),  # several row blocks per expert
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_match_the_dense_reference(case, dtype):
    num_tokens, num_experts, top_k, allowed = CASES[case]
    gate_up, down = make_experts(num_experts, 48, 40, dtype)  # odd sizes: masked tiles
    weights, ids = make_routing(num_tokens, num_experts, top_k, allowed=allowed)
    x = torch.randn(num_tokens, 48, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = experts_reference(x.float(), gate_up.float(), down.float(), weights, ids)
    for gemv_max in (0, num_tokens):  # grouped GEMMs, and the per-pair GEMV
        out = triton_moe.fused_experts(x, gate_up, down, weights, ids, gemv_max_tokens=gemv_max)
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(out, ref, dtype)


def test_align_pairs_sorts_and_pads_by_expert():
    ids = torch.tensor([3, 0, 3, 3, 1, 0, 3], dtype=torch.int32)  # 7 pairs, expert 2 idle
    pairs, block_expert = triton_moe.align_pairs(ids, num_experts=4, block_m=2)
    pad = 7
    # expert 0: pairs 1, 5; expert 1: pair 4 (+1 pad); expert 3: pairs 0, 2, 3, 6
    expected = [1, 5, 4, pad, 0, 2, 3, 6]
    assert pairs[: len(expected)].tolist() == expected
    assert (pairs[len(expected) :] == pad).all()
    assert block_expert.tolist()[:4] == [0, 1, 3, 3]
    assert (block_expert[4:] == -1).all()  # blocks past the last run are skipped
    assert pairs.numel() == 12  # 7 pairs + min(pairs, experts) x (block - 1), rounded up


def test_one_token_reads_only_the_chosen_experts():
    """The per-pair GEMV never touches an unchosen expert's weights: NaN there changes nothing."""
    gate_up, down = make_experts(8, 48, 40)
    weights, ids = make_routing(1, 8, 2)
    x = torch.randn(1, 48)
    ref = triton_moe.fused_experts(x, gate_up, down, weights, ids)
    unchosen = [e for e in range(8) if e not in ids.flatten().tolist()]
    gate_up[unchosen], down[unchosen] = float("nan"), float("nan")
    for gemv_max in (1, 0):  # also the grouped path: idle experts have no block
        out = triton_moe.fused_experts(x, gate_up, down, weights, ids, gemv_max_tokens=gemv_max)
        assert torch.equal(out, ref) if gemv_max else torch.allclose(out, ref, atol=1e-5)
