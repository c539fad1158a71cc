"""Sparse mixture-of-experts decoders on the Llama family's attention: Mixtral and Qwen3-MoE.

Each layer is Llama's (pre-norm, packed q/k/v, rotary, optional q/k norms) with its MLP replaced
by a `SparseMoeBlock` (`layers/moe.py`): a softmax router choosing `num_experts_per_tok` of the
layer's experts, their SwiGLU outputs weighted and summed.

- Mixtral: every layer sparse, `num_local_experts` experts of `intermediate_size`, weights
  renormalized over the chosen experts; HF's `block_sparse_moe.gate` and
  `block_sparse_moe.experts.<e>.w1/w2/w3` (gate / down / up).
- Qwen3-MoE: q/k RMSNorm; layer i is sparse unless listed in `mlp_only_layers` and when
  `(i + 1) % decoder_sparse_step == 0` (others keep a dense MLP of `intermediate_size`);
  `num_experts` experts of `moe_intermediate_size`; renormalized when `norm_topk_prob`;
  `mlp.gate`, `mlp.experts.<e>.gate_proj/up_proj/down_proj`.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.layers.moe import (
    HF_EXPERT_MAPPING,
    FusedMoE,
    Router,
    RouterConfig,
    SparseMoeBlock,
)
from polymodal.llm_core.layers.norm import DeferredNorm, RMSNorm, add_norm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP, Attention, Flavor, LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig


class MoeDecoderLayer(nn.Module):
    """Llama's pre-norm block with a sparse (or, where the config says, dense) MLP under the
    checkpoint's module name (`mlp_name`: "block_sparse_moe" for Mixtral, else "mlp")."""

    def __init__(self, cfg, layer_idx, rotary, backend, flavor, mlp: nn.Module, mlp_name: str):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rotary, backend, flavor)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        """Returns (this block's output, the residual stream it adds to); the MLP, dense or
        sparse, may fold the add into its last kernel (an `AddedResidual`)."""
        x, residual = add_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(rope, x, kv_cache, meta, residual)
        x, residual = add_norm(self.post_attention_layernorm, hidden, residual)
        return getattr(self, self.mlp_name)(x, residual), residual


class MoeModel(nn.Module):
    """Embedding, decoder layers, final norm (HF prefix `model.`); `make_mlp(i)` gives layer i's
    MLP."""

    def __init__(self, cfg: ModelConfig, backend, max_positions, flavor, make_mlp, mlp_name):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.text_config, cfg.rotary_dim, max_positions)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(cfg, i, self.rotary, backend, flavor, make_mlp(i), mlp_name)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        hidden, residual = inputs_embeds, None
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by every layer
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        x, _ = add_norm(self.norm, hidden, residual)
        return x.materialize() if isinstance(x, DeferredNorm) else x


class MixtralForCausalLM(ModelBase):
    """Mixtral: `embed`, `forward`, `compute_logits` (see the module docstring)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    expert_modules_mapping = HF_EXPERT_MAPPING
    mlp_name = "block_sparse_moe"
    qk_norm = False

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        bias = bool(getattr(cfg.text_config, "attention_bias", False))
        flavor = Flavor(bias, self.qk_norm, bias)
        self.model = MoeModel(cfg, backend, max_positions, flavor, self.make_mlp, self.mlp_name)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_parameters = {"lm_head.weight": "model.embed_tokens.weight"}

    def make_mlp(self, layer_idx: int) -> nn.Module:
        text = self.config.text_config
        router = RouterConfig(text.num_experts_per_tok, renormalize=True)
        experts = text.num_local_experts
        return SparseMoeBlock(
            Router(text.hidden_size, experts, router),
            FusedMoE(experts, text.hidden_size, text.intermediate_size),
        )


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Qwen3-MoE: q/k norms, dense layers by `mlp_only_layers` / `decoder_sparse_step`."""

    mlp_name = "mlp"
    qk_norm = True

    def make_mlp(self, layer_idx: int) -> nn.Module:
        text = self.config.text_config
        sparse = (
            layer_idx not in (text.mlp_only_layers or [])
            and text.num_experts > 0
            and (layer_idx + 1) % text.decoder_sparse_step == 0
        )
        if not sparse:
            return MLP(self.config)
        router = RouterConfig(text.num_experts_per_tok, renormalize=bool(text.norm_topk_prob))
        return SparseMoeBlock(
            Router(text.hidden_size, text.num_experts, router),
            FusedMoE(text.num_experts, text.hidden_size, text.moe_intermediate_size),
        )


TINY_CONFIGS = {
    # 8 experts, 3 per token (Mixtral itself takes 2)
    "mixtral": TinyConfig(
        "MixtralForCausalLM",
        {"head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 3, "intermediate_size": 48},
    ),
    # 4 layers, the second dense (`mlp_only_layers`), 8 experts of 32, 3 per token, renormalized
    "qwen3_moe": TinyConfig(
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 16,
            "num_hidden_layers": 4,
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "mlp_only_layers": [1],
            "norm_topk_prob": True,
        },
    ),
}
