"""The few-row MoE decode path with DeepSeek-V3's router and shared experts (`moe_route.py`,
`moe_decode.py`) on CPU under TRITON_INTERPRET=1: grouped sigmoid routing with the correction
bias against the torch router, the tie rule, shared experts run as extra experts in the same
launches, the `SparseMoeBlock` that takes it, and the tiny DeepSeek-V3 through the engine with
its decode steps on the fused path against transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import moe_decode
from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.moe import (
    FusedMoE,
    Router,
    RouterConfig,
    SparseMoeBlock,
    experts_reference,
    route,
)
from polymodal.llm_core.layers.norm import AddedResidual
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_moe_decode import HIDDEN, INTER, deferred, make_experts

ROUTERS = {  # name: (experts, groups, groups kept, top_k)
    "v3_grouped": (16, 4, 2, 4),  # the tiny model's router
    "ungrouped": (16, 1, 1, 4),
    "groups_of_5": (20, 4, 2, 3),  # a group size that is not a power of 2 (padding)
}


def router_inputs(name, dtype, seed):
    num_experts, groups, kept, top_k = ROUTERS[name]
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_experts, HIDDEN, generator=gen).to(dtype)
    bias = torch.rand(num_experts, generator=gen) * 0.2  # fp32, as the model keeps it
    cfg = RouterConfig(top_k, True, "sigmoid", groups, kept, 2.5)
    return weight, bias, cfg


def decode_route(x, weight, bias, cfg, shared=0):
    return moe_decode.route(x, weight, cfg.top_k, cfg.renormalize, cfg.scaling,
                            scoring="sigmoid", fp32_logits=True, correction_bias=bias,
                            num_groups=cfg.num_groups, topk_groups=cfg.topk_groups,
                            shared_experts=shared)  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("norm", [False, True])
def test_grouped_sigmoid_route_matches_the_torch_router(name, renormalize, dtype, rows, norm):
    """The torch router of the model (`Router(fp32_logits=True)`: fp32 logits of the normalized
    rows): the same experts, slots by decreasing biased score, weights within the dtype's
    tolerance; the shared expert follows as id E with weight 1. (bf16 with a deferred norm: the
    interpreter truncates the normalized x where torch rounds it, so near-ties may flip there:
    the chosen experts' biased scores match slot by slot instead.)"""
    weight, bias, cfg = router_inputs(name, dtype, seed=rows)
    cfg = RouterConfig(cfg.top_k, renormalize, "sigmoid", cfg.num_groups, cfg.topk_groups, 2.5)
    x, normed = deferred(rows, dtype, seed=rows + 3)
    logits = F.linear(normed.float(), weight.float())
    ref_weights, ref_ids = route(logits, cfg, bias)
    choice = logits.sigmoid() + bias
    for _ in range(2):  # twice: the arrival counter resets
        weights, ids = decode_route(x if norm else normed, weight, bias, cfg, shared=1)
        assert weights.shape == ids.shape == (rows, cfg.top_k + 1)
        assert ids[:, -1].tolist() == [weight.shape[0]] * rows and weights[:, -1].eq(1).all()
        ids, weights = ids[:, :-1].long(), weights[:, :-1]
        ranked = choice.gather(1, ids)
        assert (ranked[:, :-1] >= ranked[:, 1:]).all(), "slots by decreasing biased score"
        if dtype == torch.float32 or not norm:
            assert torch.equal(ids.sort(1)[0], ref_ids.sort(1)[0])
            order, ref_order = ids.argsort(1), ref_ids.argsort(1)
            assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), torch.float32)
        else:
            assert_close(ranked, choice.gather(1, ref_ids).sort(1, descending=True)[0], dtype)


def tie_rule_reference(choice, scores, cfg):
    """Our documented rule by stable sorts: groups by (score desc, id asc), then experts."""
    rows, num_experts = choice.shape
    grouped = choice.view(rows, cfg.num_groups, -1)
    group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
    keep = torch.sort(group_scores, dim=1, descending=True, stable=True)[1][:, : cfg.topk_groups]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    choice = choice.masked_fill(~mask.repeat_interleave(num_experts // cfg.num_groups, 1), -1e9)
    ids = torch.sort(choice, dim=1, descending=True, stable=True)[1][:, : cfg.top_k]
    weights = scores.gather(1, ids)
    return weights / (weights.sum(1, keepdim=True) + 1e-20) * cfg.scaling, ids


def test_exact_ties_go_to_the_lower_group_and_expert():
    """Router rows that are multiples of one vector (and a bias of repeating values) make
    groups and experts tie exactly: the lower group id, then the lower expert id, wins, slot
    by slot (torch's top-k leaves ties unordered; the weights agree whichever it took)."""
    scale = torch.tensor([0.5, 0.9, 0.9, 0.1] * 4)  # every group: the same two best
    weight = scale[:, None] * torch.linspace(-1, 1, HIDDEN)[None, :]
    x = torch.linspace(-1, 1, HIDDEN)[None, :] * 0.1  # logits ~1.5: sigmoid far from 1
    bias = torch.tensor([0.0] * 8 + [0.05] * 4 + [0.0] * 4)  # group 2 ahead; 0, 1, 3 tie
    cfg = RouterConfig(4, True, "sigmoid", 4, 2, 2.5)
    logits = F.linear(x, weight)
    weights, ids = decode_route(x, weight, bias, cfg)
    ref_weights, ref_ids = tie_rule_reference(logits.sigmoid() + bias, logits.sigmoid(), cfg)
    assert ids.tolist() == ref_ids.tolist() == [[9, 10, 1, 2]]  # group 2, then group 0
    torch.testing.assert_close(weights, ref_weights)
    torch_weights, torch_ids = route(logits, cfg, bias)
    torch.testing.assert_close(weights.sum(1), torch_weights.sum(1))


def shared_mlp(count, dtype, seed=4):
    """A shared SwiGLU MLP of `count * INTER` features (llama's `MLP`, HF's layout)."""
    from polymodal.llm_core.models.llama import MLP

    torch.manual_seed(seed)
    mlp = MLP(SimpleNamespace(hidden_size=HIDDEN, intermediate_size=count * INTER))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, HIDDEN**-0.5)
    return mlp.to(dtype)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
def test_shared_experts_run_in_the_same_launches(count, dtype, rows):
    """Routed experts + the shared MLP (cut into `count` experts of INTER features) + the
    residual, from one route and one pair of expert launches: the routed dense loop plus the
    shared MLP (fp32 math) plus the residual."""
    gate_up, down = make_experts(16, dtype)
    weight, bias, cfg = router_inputs("v3_grouped", dtype, seed=5)
    mlp = shared_mlp(count, dtype)
    x, normed = deferred(rows, dtype, seed=6)
    residual = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(7)).to(dtype)
    weights, ids = decode_route(x, weight, bias, cfg, shared=count)
    assert ids[:, -count:].tolist() == [list(range(16, 16 + count))] * rows
    shared = (mlp.gate_up_proj.weight, mlp.down_proj.weight)
    added = moe_decode.experts(x, gate_up, down, weights, ids, residual, shared=shared)
    assert isinstance(added, AddedResidual)
    routed = experts_reference(normed.float(), gate_up.float(), down.float(),
                               weights[:, :-count], ids[:, :-count].long())  # fmt: skip
    gu, dn = (w.float() for w in shared)
    ref = routed + F.linear(silu_and_mul(F.linear(normed.float(), gu)), dn) + residual.float()
    scale = 1.0 if dtype == torch.float32 else ref.abs().max().item()
    assert_close(added.h / scale, ref / scale, dtype)


def test_bad_shared_weights_name_the_shapes():
    gate_up, down = make_experts(4, torch.float32)
    mlp = shared_mlp(1, torch.float32)
    weights, ids = torch.ones(1, 3), torch.tensor([[0, 1, 4]])
    x = torch.randn(1, HIDDEN)
    with pytest.raises(ValueError, match="not S experts"):
        moe_decode.experts(x, gate_up, down, weights, ids,
                           shared=(mlp.gate_up_proj.weight[:-2], mlp.down_proj.weight))  # fmt: skip
    with pytest.raises(ValueError, match="need sigmoid"):
        moe_decode.route(x, torch.randn(4, HIDDEN), 2, correction_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="cannot give top_k=5"):
        moe_decode.route(x, torch.randn(8, HIDDEN), 5, scoring="sigmoid", num_groups=4,
                         topk_groups=2)  # fmt: skip


def deepseek_block(dtype, shared_count=1):
    """DeepSeek-V3's MoE block at test sizes: 16 experts in 4 groups (2 kept), top-4, fp32
    router logits, a random correction bias, `shared_count` shared experts."""
    torch.manual_seed(8)
    cfg = RouterConfig(4, True, "sigmoid", 4, 2, 2.5)
    gate = Router(HIDDEN, 16, cfg, correction_bias=True, fp32_logits=True)
    block = SparseMoeBlock(gate, FusedMoE(16, HIDDEN, INTER), shared_mlp(shared_count, dtype))
    block = block.to(dtype)
    with torch.no_grad():
        gate.e_score_correction_bias.data = torch.rand(16) * 0.2  # the model keeps it fp32
    return block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
def test_deepseek_block_fused_decode_matches_the_unfused_block(dtype, rows):
    """`SparseMoeBlock.forward` with `fused_decode`: route + experts with the shared MLP in
    three launches, the residual added (`AddedResidual`), as the unfused block + residual."""
    block = deepseek_block(dtype, shared_count=2)
    assert block._decode_router_args()["shared_experts"] == 2
    assert block._decode_shared_weights() is not None
    x, normed = deferred(rows, dtype, seed=9)
    residual = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(10)).to(dtype)
    ref = block(normed, residual).float() + residual.float()
    block.fused_decode = True
    added = block(x, residual)
    assert isinstance(added, AddedResidual)
    scale = 1.0 if dtype == torch.float32 else ref.abs().max().item()
    assert_close(added.h / scale, ref / scale, dtype)


def test_blocks_the_fused_path_cannot_compute_stay_unfused():
    """A shared MLP of another width, or with a bias, and a router whose top_k the kept groups
    cannot hold are refused (`fused_decode_fits` then keeps the unfused path)."""
    from polymodal.llm_core.layers.linear import Linear

    block = deepseek_block(torch.float32)
    assert block._decode_shared_weights() is not None
    block.shared_experts.down_proj = Linear(INTER + 4, HIDDEN, bias=False)
    assert block._decode_shared_weights() is None
    block = deepseek_block(torch.float32)
    block.shared_experts.down_proj = Linear(INTER, HIDDEN, bias=True)
    assert block._decode_shared_weights() is None
    block.gate.cfg = RouterConfig(9, True, "sigmoid", 4, 2, 2.5)  # 2 groups of 4 hold 8
    assert block._decode_router_args() is None
    assert not block.fused_decode_fits()  # (and CPU weights: never on CPU)


def test_deepseek_decode_steps_take_the_fused_path_and_match_transformers(tmp_path_factory,
                                                                          monkeypatch):  # fmt: skip
    """The tiny DeepSeek-V3 (grouped routing, random correction bias, a shared expert) with the
    GEMV and `fused_decode` set, as `enable_gemv` / `enable_moe_decode` do on CUDA: every
    decode step (one row, then two rows together) runs each MoE block as route + experts with
    the shared expert (an `AddedResidual` out); greedy tokens equal transformers', fp32 logits
    within 1e-4."""
    import transformers as tf

    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers import gemv
    from polymodal.llm_core.layers.linear import Linear
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import hf_greedy, record_logits_by_request, tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "deepseek_v3")
    prompts, steps = [[5, 17, 42, 99, 3, 250, 77], [7, 8, 9]], 4
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = [hf_greedy(hf, p, steps) for p in prompts]
    calls = []

    def traced(x, *args, original=moe_decode.experts, **kwargs):
        out = original(x, *args, **kwargs)
        calls.append((type(x).__name__, type(out).__name__, kwargs["shared"] is not None))
        return out

    monkeypatch.setattr(moe_decode, "experts", traced)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    for batch in ([0], [0, 1]):  # one decode row, then two
        engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=32,
                        skip_tokenizer_init=True)  # fmt: skip
        blocks = [m for m in engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
        assert len(blocks) == 2 and all(b.shared_experts is not None for b in blocks)
        for module in engine.runner.model.modules():
            if isinstance(module, Linear):
                module.gemv = gemv.gemv
            if isinstance(module, SparseMoeBlock):
                module.fused_decode = True
        seen = record_logits_by_request(engine)
        ids = [engine.add_request(prompts[i], params) for i in batch]
        calls.clear()
        final = engine.run_until_done()
        # decode steps x MoE layers (prefill rows exceed DECODE_MAX_TOKENS: unfused)
        assert len(calls) == (steps - 1) * 2
        # one row: o_proj's GEMV folds the add, the block normalizes as it loads; two rows:
        # cuBLAS there (GEMV_MAX_ROWS), a normalized tensor in
        x_type = "DeferredNorm" if len(batch) == 1 else "Tensor"
        assert all(call == (x_type, "AddedResidual", True) for call in calls), calls
        for i, rid in zip(batch, ids):
            ref_tokens, ref_logits = refs[i]
            assert final[rid].outputs[0].token_ids == ref_tokens
            for got, ref in zip(seen[rid], ref_logits):
                assert (got.cpu() - ref).abs().max().item() <= 1e-4
