"""The one-launch MoE decode block (`layers/moe_layer.py`) on CUDA at the shipped models' sizes:
a grid of many resident programs (its barrier, its per-pair waits, its counters zeroed for the
next call), eager and in a CUDA graph, against the three launches it replaces."""

import pytest
import torch

from polymodal.llm_core.layers import moe_decode, moe_layer
from tests.llm_core.test_moe_gpu import SHAPES  # (experts, top_k, hidden, intermediate)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIGS = {
    "default": moe_layer.LayerConfig(),
    "two_an_sm": moe_layer.LayerConfig(gate_up_n=16, down_n=16, num_warps=4, per_sm=2),
    "eight_an_sm": moe_layer.LayerConfig(
        gate_up_n=8, down_n=16, num_warps=2, per_sm=8, prefetch=False
    ),  # fmt: skip
}


def _inputs(name, rows, seed=0):
    from polymodal.llm_core.layers.norm import DeferredNorm

    num_experts, top_k, hidden, inter = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    h = randn(rows, hidden)
    sumsq = (h.float() ** 2).view(rows, -1, 256).sum(-1)
    x = DeferredNorm(h, sumsq, 1 + randn(hidden, scale=0.1), 1e-6)
    return dict(x=x, router=randn(num_experts, hidden, scale=hidden**-0.5),
                gate_up=randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5),
                down=randn(num_experts, hidden, inter, scale=inter**-0.5),
                residual=randn(rows, hidden), top_k=top_k)  # fmt: skip


def _three_launches(t, ids=None, weights=None):
    if ids is None:
        weights, ids = moe_decode.route(t["x"], t["router"], t["top_k"])
    out = moe_decode.experts(t["x"], t["gate_up"], t["down"], weights, ids, t["residual"])
    return out, weights, ids


def _one_launch(t, config=None):
    return moe_layer.moe_layer(t["x"], t["router"], t["gate_up"], t["down"], t["top_k"],
                               residual=t["residual"], config=config)  # fmt: skip


def _check(out, weights, ids, t):
    """The routing `route` picks (the same experts unless two logits tie within bf16's
    rounding), and given it, `experts`' output within the tiles' fp32 summation order."""
    ref_out, ref_weights, ref_ids = _three_launches(t)
    if not torch.equal(ids, ref_ids):  # a near-tie: the logits of both choices agree
        from polymodal.llm_core.layers.norm import rms_norm_torch

        normed = rms_norm_torch(t["x"].h, t["x"].weight, t["x"].eps)[0]
        logits = torch.nn.functional.linear(normed, t["router"]).float()
        diff = logits.gather(1, ids.long()) - logits.gather(1, ref_ids.long())
        assert diff.abs().max().item() <= 2e-2 * logits.abs().max().item()
    torch.testing.assert_close(weights, ref_weights, atol=2e-2, rtol=2e-2)
    ref = _three_launches(t, ids, weights)[0]
    scale = ref.h.float().abs().max().item()
    assert (out.h.float() - ref.h.float()).abs().max().item() <= 1e-2 * scale
    # (per feature block: the launches' blocks may differ)
    torch.testing.assert_close(out.sumsq.sum(1), ref.sumsq.sum(1), rtol=2e-2, atol=1e-3)


CASES = [("default", "qwen3_30b_a3b", 1), ("default", "qwen3_30b_a3b", 2),
         ("default", "qwen3_30b_a3b", 8), ("default", "mixtral_8x7b", 1),
         ("default", "mixtral_8x7b", 3), ("two_an_sm", "qwen3_30b_a3b", 1),
         ("two_an_sm", "qwen3_30b_a3b", 8), ("eight_an_sm", "qwen3_30b_a3b", 1)]  # fmt: skip


@pytest.mark.parametrize("config,name,rows", CASES)
def test_one_launch_matches_route_then_experts(config, name, rows):
    """Three calls in a row (the counters are zero again after each) on new inputs."""
    for seed in range(3):
        t = _inputs(name, rows, seed)
        _check(*_one_launch(t, CONFIGS[config]), t)


@pytest.mark.parametrize("rows", [1, 4])
def test_one_launch_captures_in_a_cuda_graph(rows):
    """Captured once; replays on new rows equal the eager launch bit for bit (twice)."""
    t = _inputs("qwen3_30b_a3b", rows)
    _one_launch(t)  # compile outside the capture
    _one_launch(t)  # (the second call may take more programs an SM)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _, ids = _one_launch(t)
    for seed in (7, 8):
        new = _inputs("qwen3_30b_a3b", rows, seed)
        t["x"].h.copy_(new["x"].h)
        t["x"].sumsq.copy_(new["x"].sumsq)
        graph.replay()
        torch.cuda.synchronize()
        eager, _, eager_ids = _one_launch(t)
        assert torch.equal(ids, eager_ids)
        assert torch.equal(out.h, eager.h) and torch.equal(out.sumsq, eager.sumsq)


def test_deepseek_router_and_shared_expert():
    """DeepSeek-V3's grouped sigmoid routing (fp32 logits, bias, scaled) and one shared expert
    at its sizes: `route`'s ids and `experts`' output."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    experts, hidden, inter = 256, 7168, 2048
    from polymodal.llm_core.layers.norm import DeferredNorm

    small = dict(device="cuda", generator=gen)
    h = torch.randn(1, hidden, **small).to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(hidden, **small)).to(torch.bfloat16)
    x = DeferredNorm(h, (h.float() ** 2).view(1, -1, 256).sum(-1), norm_w, 1e-6)
    router = (torch.randn(experts, hidden, **small) * hidden**-0.5).to(torch.bfloat16)
    gate_up = (torch.randn(experts, 2 * inter, hidden, **small) * 0.01).to(torch.bfloat16)
    down = (torch.randn(experts, hidden, inter, **small) * 0.02).to(torch.bfloat16)
    shared = ((torch.randn(2 * inter, hidden, **small) * 0.01).to(torch.bfloat16),
              (torch.randn(hidden, inter, **small) * 0.02).to(torch.bfloat16))  # fmt: skip
    bias = torch.rand(experts, device="cuda", generator=gen) * 0.1
    residual = torch.randn(1, hidden, **small).to(torch.bfloat16)
    args = dict(scoring="sigmoid", fp32_logits=True, correction_bias=bias, num_groups=8,
                topk_groups=4)  # fmt: skip
    ref_w, ref_ids = moe_decode.route(x, router, 8, True, 2.5, shared_experts=1, **args)
    out, weights, ids = moe_layer.moe_layer(x, router, gate_up, down, 8, True, 2.5, residual,
                                            shared=shared, **args)  # fmt: skip
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w)
    ref = moe_decode.experts(x, gate_up, down, weights, ids, residual, shared=shared)
    scale = ref.h.float().abs().max().item()
    assert (out.h.float() - ref.h.float()).abs().max().item() <= 1e-2 * scale
