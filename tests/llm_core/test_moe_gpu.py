"""The fused MoE kernels on CUDA at the shipped models' sizes, against the dense per-expert
reference (fp32 math over the same bf16 weights); no host sync (CUDA-graph capture and replay)."""

import pytest
import torch

from polymodal.llm_core.layers.moe import experts_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = {  # name: (experts, top_k, hidden, expert intermediate)
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "deepseek_v3": (256, 8, 7168, 2048),
}


def _experts(num_experts, hidden, inter, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen)
    down = torch.randn(num_experts, hidden, inter, device="cuda", generator=gen)
    return (gate_up * hidden**-0.5).to(dtype), (down * inter**-0.5).to(dtype)


def _routing(num_tokens, num_experts, top_k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=gen)
    weights, ids = scores.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 512, 2048])
def test_fused_experts_match_the_dense_reference(name, num_tokens):
    from polymodal.llm_core.layers.triton_moe import fused_experts

    num_experts, top_k, hidden, inter = SHAPES[name]
    gate_up, down = _experts(num_experts, hidden, inter)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    ref = experts_reference(x.float(), gate_up.float(), down.float(), weights, ids)
    out = fused_experts(x, gate_up, down, weights, ids)
    scale = ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2e-2 * scale
    if num_tokens <= 4:  # the grouped GEMMs at small batches agree too
        grouped = fused_experts(x, gate_up, down, weights, ids, gemv_max_tokens=0)
        assert (grouped.float() - ref).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("num_tokens", [1, 16])
def test_fused_experts_fp32_within_1e4(num_tokens):
    """fp32 weights (the parity tests' dtype): the kernels' dots are IEEE fp32, not TF32."""
    from polymodal.llm_core.layers.triton_moe import fused_experts

    gate_up, down = _experts(16, 256, 128, torch.float32)
    weights, ids = _routing(num_tokens, 16, 4)
    x = torch.randn(num_tokens, 256, device="cuda")
    ref = experts_reference(x, gate_up, down, weights, ids)
    torch.testing.assert_close(fused_experts(x, gate_up, down, weights, ids), ref,
                               atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("num_tokens", [1, 48])
def test_fused_experts_capture_in_a_cuda_graph(num_tokens):
    """No host sync anywhere (the sort/pad step included): capture once, replay on new routing."""
    from polymodal.llm_core.layers.triton_moe import fused_experts

    gate_up, down = _experts(64, 512, 256)
    weights, ids = _routing(num_tokens, 64, 6)
    x = torch.randn(num_tokens, 512, device="cuda").to(torch.bfloat16)
    fused_experts(x, gate_up, down, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, gate_up, down, weights, ids)
    new_weights, new_ids = _routing(num_tokens, 64, 6, seed=5)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, fused_experts(x, gate_up, down, weights, ids))


def _deferred(rows, hidden, seed=1):
    """A `DeferredNorm` of random bf16 rows (sums of squares per 16 features) and its
    normalization by the RMSNorm kernel."""
    from polymodal.llm_core.layers.norm import DeferredNorm

    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(rows, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    sumsq = (h.float() ** 2).view(rows, -1, 16).sum(-1)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(torch.bfloat16)
    norm = DeferredNorm(h, sumsq, weight, 1e-6)
    return norm, norm.materialize()


@pytest.mark.parametrize("name", ["qwen3_30b_a3b", "mixtral_8x7b"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_moe_decode_route_matches_the_torch_router(name, renormalize, rows):
    """bf16 logits tie often: slot by slot the chosen experts' logits equal the reference's
    (up to one bf16 rounding: cuBLAS sums in another order), weights within 1e-2."""
    from polymodal.llm_core.layers import moe_decode
    from polymodal.llm_core.layers.moe import RouterConfig, route

    num_experts, top_k, hidden, _ = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    weight = torch.randn(num_experts, hidden, device="cuda", generator=gen) * hidden**-0.5
    weight = weight.to(torch.bfloat16)
    x, normed = _deferred(rows, hidden)
    logits = torch.nn.functional.linear(normed, weight)
    ref_weights, ref_ids = route(logits, RouterConfig(top_k, renormalize))
    weights, ids = moe_decode.route(x, weight, top_k, renormalize)
    chosen, ref_chosen = logits.gather(1, ids.long()).float(), logits.gather(1, ref_ids).float()
    torch.testing.assert_close(chosen, ref_chosen, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(weights, ref_weights, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_moe_decode_experts_match_the_dense_reference(name, rows):
    """A `DeferredNorm` in, the residual added: h within 2e-2 of the fp32 loop's scale."""
    from polymodal.llm_core.layers import moe_decode

    num_experts, top_k, hidden, inter = SHAPES[name]
    gate_up, down = _experts(num_experts, hidden, inter)
    weights, ids = _routing(rows, num_experts, top_k)
    x, normed = _deferred(rows, hidden)
    residual = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
    ref = experts_reference(normed.float(), gate_up.float(), down.float(), weights, ids)
    added = moe_decode.experts(x, gate_up, down, weights, ids, residual)
    scale = ref.abs().max().item()
    assert (added.h.float() - residual.float() - ref).abs().max().item() <= 2e-2 * scale
    torch.testing.assert_close(added.sumsq.sum(1), (added.h.float() ** 2).sum(1), rtol=1e-4,
                               atol=0)  # fmt: skip


@pytest.mark.parametrize("rows", [1, 4])
def test_moe_decode_captures_in_a_cuda_graph(rows):
    """Route + experts captured once; replays on new input rows give the eager result (twice:
    the arrival counters are back at zero after each replay)."""
    from polymodal.llm_core.layers import moe_decode

    num_experts, top_k, hidden, inter = SHAPES["qwen3_30b_a3b"]
    gate_up, down = _experts(num_experts, hidden, inter)
    router = (torch.randn(num_experts, hidden, device="cuda") * hidden**-0.5).to(torch.bfloat16)
    x, _ = _deferred(rows, hidden)
    residual = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)

    def block():
        weights, ids = moe_decode.route(x, router, top_k)
        return moe_decode.experts(x, gate_up, down, weights, ids, residual)

    block()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block()
    for seed in (7, 8):
        new_x, _ = _deferred(rows, hidden, seed=seed)
        x.h.copy_(new_x.h)
        x.sumsq.copy_(new_x.sumsq)
        graph.replay()
        torch.cuda.synchronize()
        eager = block()
        assert torch.equal(out.h, eager.h) and torch.equal(out.sumsq, eager.sumsq)


def test_sparse_block_fused_decode_matches_the_unfused_block():
    """Qwen3-30B-A3B's block in bf16: with `enable_moe_decode` one row returns the residual
    added (within the unfused block's rounding), five rows keep the unfused path."""
    from polymodal.llm_core.layers.moe import (
        DECODE_MAX_TOKENS,
        FusedMoE,
        Router,
        RouterConfig,
        SparseMoeBlock,
        enable_moe_decode,
    )

    num_experts, top_k, hidden, inter = SHAPES["qwen3_30b_a3b"]
    torch.manual_seed(0)
    gate = Router(hidden, num_experts, RouterConfig(top_k))
    block = SparseMoeBlock(gate, FusedMoE(num_experts, hidden, inter)).cuda().to(torch.bfloat16)
    assert enable_moe_decode(block) == 1 and block.fused_decode
    x, normed = _deferred(1, hidden)
    residual = torch.randn(1, hidden, device="cuda").to(torch.bfloat16)
    added = block(x, residual)
    block.fused_decode = False
    ref = block(x, residual) + residual
    scale = ref.abs().max().item()
    assert (added.h.float() - ref.float()).abs().max().item() <= 2e-2 * scale
    block.fused_decode = True
    rows = DECODE_MAX_TOKENS + 1
    x, normed = _deferred(rows, hidden)
    assert isinstance(block(x, torch.zeros_like(normed)), torch.Tensor)  # the unfused path
