"""The MoE layer on CPU: routers against transformers' (softmax top-k with and without
renormalisation, DeepSeek-V3's sigmoid + correction bias + grouped top-k + scaling), stacked
experts loaded from per-expert checkpoint names (HF and Mixtral's w1/w2/w3), the dense path
against transformers' experts, and the bytes one step reads."""

import pytest
import torch
import transformers as tf
from torch import nn

from polymodal.llm_core.layers.moe import (
    HF_EXPERT_MAPPING,
    FusedMoE,
    Router,
    RouterConfig,
    SparseMoeBlock,
    route,
)
from polymodal.llm_core.models.base import ModelBase


def _same_choice(weights, ids, ref_weights, ref_ids):
    """Equal (expert, weight) sets per token, whatever the order of the top-k slots."""
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices),
                               ref_weights.float().gather(1, ref_order.indices))  # fmt: skip


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_router_matches_qwen3_moe(renormalize):
    cfg = tf.Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3,
                            norm_topk_prob=renormalize)  # fmt: skip
    ref = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(cfg)
    nn.init.normal_(ref.weight)
    router = Router(32, 8, RouterConfig(3, renormalize))
    router.weight.data.copy_(ref.weight)
    x = torch.randn(13, 32)
    _, ref_weights, ref_ids = ref(x)
    _same_choice(*router(x), ref_weights, ref_ids)


def test_mixtral_router_renormalizes():
    cfg = tf.MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    ref = tf.models.mixtral.modeling_mixtral.MixtralTopKRouter(cfg)
    nn.init.normal_(ref.weight)
    router = Router(32, 8, RouterConfig(2, True))
    router.weight.data.copy_(ref.weight)
    x = torch.randn(9, 32)
    weights, ids = router(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    _same_choice(weights, ids, *ref(x)[1:])


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
def test_grouped_sigmoid_router_matches_deepseek_v3(groups):
    n_group, topk_group = groups
    cfg = tf.DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
    )
    ref = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.e_score_correction_bias)
    router_cfg = RouterConfig(4, True, "sigmoid", n_group, topk_group, 2.5)
    router = Router(32, 16, router_cfg, correction_bias=True, fp32_logits=True)
    router.weight.data.copy_(ref.weight)
    router.e_score_correction_bias.data.copy_(ref.e_score_correction_bias)
    x = torch.randn(11, 32)
    weights, ids = router(x)
    _same_choice(weights, ids, *ref(x)[1:])
    if n_group > 1:  # every token's experts come from its topk_group best groups
        groups_used = (ids // (16 // n_group)).tolist()
        assert all(len(set(g)) <= topk_group for g in groups_used)


def test_group_choice_uses_the_correction_bias_but_weights_do_not():
    logits = torch.zeros(1, 4)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    weights, ids = route(logits, RouterConfig(1, False, "sigmoid"), bias)
    assert ids.tolist() == [[3]] and weights.tolist() == [[0.5]]


class ToyMoE(ModelBase):
    expert_modules_mapping = HF_EXPERT_MAPPING

    def __init__(self):
        super().__init__()
        self.mlp = SparseMoeBlock(Router(8, 3, RouterConfig(2)), FusedMoE(3, 8, 5))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_per_expert_tensors_load_into_the_stacked_parameters(names):
    gate, up, down = names
    tensors = {"mlp.gate.weight": torch.randn(3, 8)}
    for e in range(3):
        tensors[f"mlp.experts.{e}.{gate}.weight"] = torch.randn(5, 8)
        tensors[f"mlp.experts.{e}.{up}.weight"] = torch.randn(5, 8)
        tensors[f"mlp.experts.{e}.{down}.weight"] = torch.randn(8, 5)
    model = ToyMoE()
    model.load_weights(tensors.items())
    experts = model.mlp.experts
    for e in range(3):
        assert torch.equal(experts.gate_up_proj[e, :5], tensors[f"mlp.experts.{e}.{gate}.weight"])
        assert torch.equal(experts.gate_up_proj[e, 5:], tensors[f"mlp.experts.{e}.{up}.weight"])
        assert torch.equal(experts.down_proj[e], tensors[f"mlp.experts.{e}.{down}.weight"])
    from polymodal.llm_core.errors import ModelLoadError

    del tensors[f"mlp.experts.2.{up}.weight"]
    with pytest.raises(ModelLoadError, match="missing.*gate_up_proj"):
        ToyMoE().load_weights(tensors.items())


def test_dense_path_matches_transformers_experts():
    cfg = tf.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, num_experts=6,
                            num_experts_per_tok=2)  # fmt: skip
    ref = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg)
    nn.init.normal_(ref.gate_up_proj)
    nn.init.normal_(ref.down_proj)
    experts = FusedMoE(6, 16, 12)
    experts.gate_up_proj.data.copy_(ref.gate_up_proj)
    experts.down_proj.data.copy_(ref.down_proj)
    x, ids = torch.randn(7, 16), torch.randint(0, 6, (7, 1)).repeat(1, 2)
    ids[:, 1] = (ids[:, 0] + 1) % 6
    weights = torch.rand(7, 2)
    torch.testing.assert_close(experts(x, weights, ids), ref(x, ids, weights))


def test_expert_bytes():
    experts = FusedMoE(4, 16, 8)
    assert experts.expert_bytes() == 3 * 16 * 8 * 4  # gate, up, down in fp32


def test_stacked_tensors_load_whole():
    """transformers v5's in-memory layout (`experts.gate_up_proj [E, 2I, H]`, as its
    `state_dict()` names them) loads as is: the bench hands our model transformers' tensors."""
    tensors = {
        "mlp.gate.weight": torch.randn(3, 8),
        "mlp.experts.gate_up_proj": torch.randn(3, 10, 8),
        "mlp.experts.down_proj": torch.randn(3, 8, 5),
    }
    model = ToyMoE()
    model.load_weights(tensors.items())
    assert torch.equal(model.mlp.experts.gate_up_proj, tensors["mlp.experts.gate_up_proj"])
    assert torch.equal(model.mlp.experts.down_proj, tensors["mlp.experts.down_proj"])
