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
