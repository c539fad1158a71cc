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


SWEPT = [(4, 2048, 8), (8, 1024, 8), (8, 1024, 4), (16, 512, 4), (32, 256, 8)]


@pytest.mark.parametrize("gate_up_cfg", SWEPT)
@pytest.mark.parametrize("down_cfg", SWEPT)
@pytest.mark.parametrize("rows", [1, 2])
def test_moe_decode_swept_configs_match_the_dense_reference(gate_up_cfg, down_cfg, rows):
    """Qwen3-30B-A3B's experts under launch configs `bench_moe.py --sweep` times (one-tile K
    and tiled, down's first tile loaded before its PDL wait): the dense loop's output."""
    from polymodal.llm_core.layers.gemv import GemvConfig

    configs = tuple(GemvConfig(block_n=n, block_k=k, num_warps=w)
                    for n, k, w in (gate_up_cfg, down_cfg))  # fmt: skip
    _check_qwen3_experts(rows, configs=configs)


@pytest.mark.parametrize("down_cfg", SWEPT)
@pytest.mark.parametrize("rows", [1, 2])
def test_moe_decode_late_down_loads_match_the_dense_reference(down_cfg, rows):
    """`early_loads=False` (down loads everything after its PDL wait; `bench_moe.py --ab`'s
    other side) at each swept down config: the dense loop's output."""
    from polymodal.llm_core.layers.gemv import GemvConfig

    n, k, w = down_cfg
    configs = (GemvConfig(block_n=16, block_k=512), GemvConfig(block_n=n, block_k=k, num_warps=w))
    _check_qwen3_experts(rows, configs=configs, early_loads=False)


def _check_qwen3_experts(rows: int, **launch):
    """Qwen3-30B-A3B's experts through `moe_decode.experts` (x a `DeferredNorm`, a residual)
    under `launch` (configs, early_loads): the dense loop's output, to 2% of its largest value."""
    from polymodal.llm_core.layers import moe_decode

    num_experts, top_k, hidden, inter = SHAPES["qwen3_30b_a3b"]
    gate_up, down = _experts(num_experts, hidden, inter)
    weights, ids = _routing(rows, num_experts, top_k, seed=rows)
    x, normed = _deferred(rows, hidden)
    residual = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
    ref = experts_reference(normed.float(), gate_up.float(), down.float(), weights, ids)
    added = moe_decode.experts(x, gate_up, down, weights, ids, residual, **launch)
    scale = ref.abs().max().item()
    assert (added.h.float() - residual.float() - ref).abs().max().item() <= 2e-2 * scale


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


# DeepSeek-V3's router (fp32 logits, sigmoid + correction bias, 8 groups keep 4, top-8, scaled
# 2.5) and its shared expert, on the fused decode path
DEEPSEEK_ROUTER = dict(top_k=8, renormalize=True, scoring="sigmoid", num_groups=8,
                       topk_groups=4, scaling=2.5)  # fmt: skip


def _deepseek_route(x, weight, bias, shared=1):
    from polymodal.llm_core.layers import moe_decode

    cfg = DEEPSEEK_ROUTER
    return moe_decode.route(x, weight, cfg["top_k"], cfg["renormalize"], cfg["scaling"],
                            scoring="sigmoid", fp32_logits=True, correction_bias=bias,
                            num_groups=cfg["num_groups"], topk_groups=cfg["topk_groups"],
                            shared_experts=shared)  # fmt: skip


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_moe_decode_deepseek_route_matches_the_torch_router(rows):
    """The model's torch router (fp32 `F.linear` of the normalized bf16 rows): slot by slot the
    chosen experts' biased scores equal the reference's (cuBLAS sums in another order, so an
    exact near-tie may flip: the contract is on the scores); rows that chose the same experts
    (all but such ties) have weights within 1e-4; the shared expert's slot is id 256, weight 1."""
    from polymodal.llm_core.layers.moe import RouterConfig, route

    num_experts, _, hidden, _ = SHAPES["deepseek_v3"]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    weight = torch.randn(num_experts, hidden, device="cuda", generator=gen) * hidden**-0.5
    weight = weight.to(torch.bfloat16)
    bias = torch.rand(num_experts, device="cuda", generator=gen) * 0.1
    x, normed = _deferred(rows, hidden)
    logits = torch.nn.functional.linear(normed.float(), weight.float())
    ref_weights, ref_ids = route(logits, RouterConfig(**DEEPSEEK_ROUTER), bias)
    weights, ids = _deepseek_route(x, weight, bias)
    assert ids[:, -1].eq(num_experts).all() and weights[:, -1].eq(1).all()
    ids, weights = ids[:, :-1].long(), weights[:, :-1]
    choice = logits.sigmoid() + bias
    ref_choice, order = choice.gather(1, ref_ids).sort(1, descending=True)
    torch.testing.assert_close(choice.gather(1, ids), ref_choice, atol=1e-5, rtol=0)
    same = (ids.sort(1)[0] == ref_ids.sort(1)[0]).all(1)
    assert same.any()
    torch.testing.assert_close(weights[same], ref_weights.gather(1, order)[same], atol=1e-4,
                               rtol=1e-4)  # fmt: skip


def _shared(hidden, inter, count=1):
    gen = torch.Generator(device="cuda").manual_seed(3)
    gate_up = torch.randn(2 * count * inter, hidden, device="cuda", generator=gen) * hidden**-0.5
    down = torch.randn(hidden, count * inter, device="cuda", generator=gen) * inter**-0.5
    return gate_up.to(torch.bfloat16), down.to(torch.bfloat16)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_moe_decode_experts_with_shared_match_the_reference(count, rows):
    """DeepSeek-V3's sizes: routed experts + the shared MLP (`count` experts of 2048 features)
    in the same two launches, a `DeferredNorm` in, the residual added: within 2e-2 of the
    scale of the fp32 routed loop + shared MLP."""
    from polymodal.llm_core.layers import moe_decode
    from polymodal.llm_core.layers.activation import silu_and_mul

    num_experts, top_k, hidden, inter = SHAPES["deepseek_v3"]
    gate_up, down = _experts(num_experts, hidden, inter)
    weights, ids = _routing(rows, num_experts, top_k)
    shared = _shared(hidden, inter, count)
    extra = torch.arange(num_experts, num_experts + count, device="cuda").expand(rows, count)
    all_ids = torch.cat([ids, extra], 1)
    all_weights = torch.cat([weights, torch.ones(rows, count, device="cuda")], 1)
    x, normed = _deferred(rows, hidden)
    residual = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
    ref = experts_reference(normed.float(), gate_up.float(), down.float(), weights, ids)
    gu, dn = (w.float() for w in shared)
    ref = ref + torch.nn.functional.linear(silu_and_mul(normed.float() @ gu.T), dn)
    added = moe_decode.experts(x, gate_up, down, all_weights, all_ids, residual, shared=shared)
    scale = ref.abs().max().item()
    assert (added.h.float() - residual.float() - ref).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("rows", [1, 2])
def test_moe_decode_deepseek_captures_in_a_cuda_graph(rows):
    """DeepSeek routing + routed and shared experts captured once; replays on new rows give
    the eager result, twice (the arrival counters are back at zero)."""
    from polymodal.llm_core.layers import moe_decode

    num_experts, _, hidden, inter = SHAPES["deepseek_v3"]
    gate_up, down = _experts(num_experts, hidden, inter)
    shared = _shared(hidden, inter)
    router = (torch.randn(num_experts, hidden, device="cuda") * hidden**-0.5).to(torch.bfloat16)
    bias = torch.rand(num_experts, device="cuda") * 0.1
    x, _ = _deferred(rows, hidden)
    residual = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)

    def block():
        weights, ids = _deepseek_route(x, router, bias)
        return moe_decode.experts(x, gate_up, down, weights, ids, residual, shared=shared)

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


def test_deepseek_block_fused_decode_matches_the_unfused_block():
    """A DeepSeek-V3-style block in bf16 (256 experts in 8 groups, fp32 router logits, a
    correction bias, one shared expert; narrower than V3): `enable_moe_decode` takes it; one and
    two rows return the residual added within the unfused block's rounding, three rows keep the
    unfused path."""
    from types import SimpleNamespace

    from polymodal.llm_core.layers.moe import (
        DECODE_MAX_TOKENS,
        FusedMoE,
        Router,
        RouterConfig,
        SparseMoeBlock,
        enable_moe_decode,
    )
    from polymodal.llm_core.models.llama import MLP

    num_experts, hidden, inter = 256, 1024, 256
    torch.manual_seed(0)
    with torch.device("cuda"):
        gate = Router(hidden, num_experts, RouterConfig(**DEEPSEEK_ROUTER), correction_bias=True,
                      fp32_logits=True)  # fmt: skip
        shared = MLP(SimpleNamespace(hidden_size=hidden, intermediate_size=inter))
        block = SparseMoeBlock(gate, FusedMoE(num_experts, hidden, inter), shared)
    block = block.to(torch.bfloat16)
    gate.e_score_correction_bias.data = torch.rand(num_experts, device="cuda") * 0.1  # fp32
    assert enable_moe_decode(block) == 1 and block.fused_decode
    for rows in (1, 2):
        x, normed = _deferred(rows, hidden)
        residual = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
        added = block(x, residual)
        block.fused_decode = False
        ref = block(normed, residual) + residual
        block.fused_decode = True
        scale = ref.abs().max().item()
        assert (added.h.float() - ref.float()).abs().max().item() <= 2e-2 * scale
    x, normed = _deferred(DECODE_MAX_TOKENS + 1, hidden)
    assert isinstance(block(x, torch.zeros_like(normed)), torch.Tensor)  # the unfused path
