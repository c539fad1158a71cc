"""DeepSeek-V3 (and R1): multi-head latent attention over a latent KV cache, and
mixture-of-experts MLPs with shared experts and grouped sigmoid routing.

- Attention (`attention/mla.py`): q through a LoRA (`q_a_proj` -> RMSNorm -> `q_b_proj`; or
  `q_proj` without `q_lora_rank`), keys and values from one latent per token
  (`kv_a_proj_with_mqa` -> `[c | k_pe]`, c normalized, up-projected by `kv_b_proj`), decoupled
  rotary on `qk_rope_head_dim` features (YaRN with its mscale in the cos/sin and, through
  `mscale_all_dim`, in the softmax scale). The cache keeps `kv_lora_rank + qk_rope_head_dim`
  numbers per token and layer. `q_a_proj` and `kv_a_proj_with_mqa` run as one matmul.
- MLP: the first `first_k_dense_replace` layers dense (SwiGLU of `intermediate_size`); then
  `n_routed_experts` experts of `moe_intermediate_size` chosen by sigmoid scores + the
  correction bias, `n_group` / `topk_group` grouped top-k, weights renormalized
  (`norm_topk_prob`) and scaled (`routed_scaling_factor`), plus `n_shared_experts` shared
  experts as one MLP. Decode steps of up to `DECODE_MAX_TOKENS` rows on CUDA (bf16/fp16, with
  `decode_gemv`) run the whole block, routing and shared experts included, on the fused
  `moe_decode` path (`SparseMoeBlock`, `enable_moe_decode`); prefill keeps this one.
- Multi-token prediction: the checkpoint's `num_nextn_predict_layers` extra layers (indices
  from `num_hidden_layers` on) are skipped by this mapping (`ignored_weights`); the first is a
  draft head for speculative decoding (`speculative_config={"method": "mtp"}`: models/mtp.py).
Block-wise FP8 checkpoints (`quantization_config`) need the quantized `LinearMethod` /
`ExpertsMethod`: not loaded here yet.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from polymodal.llm_core.attention.mla import MLAAttention
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.layers.moe import (
    HF_EXPERT_MAPPING,
    FusedMoE,
    Router,
    RouterConfig,
    SparseMoeBlock,
)
from polymodal.llm_core.layers.norm import DeferredNorm, RMSNorm, add_norm
from polymodal.llm_core.layers.rotary import RotaryEmbedding, rope_parameters
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP
from polymodal.llm_core.models.tiny import TinyConfig


def softmax_scale(text) -> float:
    """`qk_head_dim^-0.5`, times YaRN's `mscale(factor, mscale_all_dim)^2` when scaled."""
    scale = (text.qk_nope_head_dim + text.qk_rope_head_dim) ** -0.5
    rope = rope_parameters(text)
    all_dim = rope.get("mscale_all_dim", 0)
    if rope.get("rope_type", "default") != "default" and all_dim and rope["factor"] > 1:
        scale *= (0.1 * all_dim * math.log(rope["factor"]) + 1.0) ** 2
    return scale


class DeepseekV3Attention(nn.Module):
    """MLA projections around an `MLAAttention` (HF names)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend):
        super().__init__()
        text = cfg.text_config
        heads, nope, rope = text.num_attention_heads, text.qk_nope_head_dim, text.qk_rope_head_dim
        rank, v_dim, self.q_rank = text.kv_lora_rank, text.v_head_dim, text.q_lora_rank
        self.heads, self.qk_dim, self.kv_a_dim = heads, nope + rope, rank + rope
        bias = bool(text.attention_bias)
        if self.q_rank:
            sizes = {"q_a": self.q_rank, "kv_a": self.kv_a_dim}
            self.fused_qkv_a_proj = PackedLinear(cfg.hidden_size, sizes, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_rank, 1e-6)  # HF's default eps, not the config's
            self.q_b_proj = Linear(self.q_rank, heads * self.qk_dim, bias=False)
        else:
            self.q_proj = Linear(cfg.hidden_size, heads * self.qk_dim, bias=False)
            self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.kv_a_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(rank, 1e-6)
        self.kv_b_proj = Linear(rank, heads * (nope + v_dim), bias=False)
        self.o_proj = Linear(heads * v_dim, cfg.hidden_size, bias=bias)
        interleaved = bool(getattr(text, "rope_interleave", True))
        self.attn = MLAAttention(heads, nope, rope, v_dim, rank, softmax_scale(text), backend,
                                 rotary, interleaved)  # fmt: skip

    def forward(self, rope, x, kv_cache, meta, residual=None):
        """`x` as `Linear.forward` takes it; `residual` as `Linear.fused` (folded into o_proj)."""
        num_tokens = (x.h if isinstance(x, DeferredNorm) else x).shape[0]
        if self.q_rank:
            q_a, kv_a = self.fused_qkv_a_proj(x).split([self.q_rank, self.kv_a_dim], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        latent, k_pe = kv_a.split([self.attn.rank, self.attn.rope_dim], dim=-1)
        q = q.view(num_tokens, self.heads, self.qk_dim)
        out = self.attn(q, self.kv_a_layernorm(latent), k_pe, rope, kv_cache, meta, self.kv_b_proj)
        return self.o_proj.fused(out, residual=residual)


def moe_block(cfg: ModelConfig) -> SparseMoeBlock:
    """Routed experts (grouped sigmoid routing) plus the shared experts as one MLP."""
    text = cfg.text_config
    router = RouterConfig(
        text.num_experts_per_tok,
        renormalize=bool(text.norm_topk_prob),
        scoring="sigmoid",
        num_groups=text.n_group or 1,
        topk_groups=text.topk_group or 1,
        scaling=text.routed_scaling_factor,
    )
    experts, hidden, inter = text.n_routed_experts, text.hidden_size, text.moe_intermediate_size
    shared = None
    if text.n_shared_experts:
        shared = MLP(replace(cfg, intermediate_size=inter * text.n_shared_experts))
    return SparseMoeBlock(
        Router(hidden, experts, router, correction_bias=True, fp32_logits=True),
        FusedMoE(experts, hidden, inter),
        shared,
    )


class DeepseekV3DecoderLayer(nn.Module):
    """Pre-norm block: MLA, then a dense MLP (first layers) or the MoE block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary, backend):
        super().__init__()
        self.self_attn = DeepseekV3Attention(cfg, rotary, backend)
        dense = layer_idx < cfg.text_config.first_k_dense_replace
        self.mlp = MLP(cfg) if dense else moe_block(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        x, residual = add_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(rope, x, kv_cache, meta, residual)
        x, residual = add_norm(self.post_attention_layernorm, hidden, residual)
        return self.mlp(x, residual), residual  # either MLP may fold the add (AddedResidual)


class DeepseekV3Model(nn.Module):
    """Embedding, decoder layers, final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope_dim = cfg.text_config.qk_rope_head_dim
        self.rotary = RotaryEmbedding(cfg.text_config, rope_dim, max_positions)
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(cfg, i, self.rotary, backend) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        hidden, residual = inputs_embeds, None
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by every layer
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        x, _ = add_norm(self.norm, hidden, residual)
        return x.materialize() if isinstance(x, DeferredNorm) else x


class DeepseekV3ForCausalLM(ModelBase):
    """DeepSeek-V3: `embed`, `forward`, `compute_logits` (see the module docstring)."""

    packed_modules_mapping = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "q_a_proj": ("fused_qkv_a_proj", "q_a"),
        "kv_a_proj_with_mqa": ("fused_qkv_a_proj", "kv_a"),
    }
    expert_modules_mapping = HF_EXPERT_MAPPING
    # The expanded prefill up-projects every cached latent of the step's sequences: a captured
    # prefill graph would do it for its whole table width (all of max_model_len).
    supports_prefill_graphs = False
    # decode folds kv_b_proj's weight into the query and output (absorbed MLA): an adapter on it
    # would be skipped there, so LoRA is refused for the family
    supports_lora = False

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        text = cfg.text_config
        mtp = getattr(text, "num_nextn_predict_layers", 0) or 0
        if mtp:  # the multi-token-prediction layers follow the decoder's in the checkpoint
            layers = "|".join(str(cfg.num_layers + i) for i in range(mtp))
            self.ignored_weights = (rf"^model\.layers\.(?:{layers})\.",)
        self.model = DeepseekV3Model(cfg, backend, max_positions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_parameters = {"lm_head.weight": "model.embed_tokens.weight"}


def _tiny_deepseek(hf_config, dtype):
    """transformers' model with a random (not zero) correction bias, so it shifts the choice."""
    import transformers as tf

    model = tf.DeepseekV3ForCausalLM._from_config(hf_config, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers[hf_config.first_k_dense_replace :]:
        bias = layer.mlp.gate.e_score_correction_bias
        bias.copy_(torch.rand(bias.shape, generator=gen) * 0.2)
    return model


TINY_CONFIGS = {
    # 3 layers (the first dense), 4 heads with q LoRA, 16 experts in 4 groups (2 kept), 4 per
    # token, a shared expert; YaRN (factor 4, mscales) with interleaved rotary
    "deepseek_v3": TinyConfig(
        "DeepseekV3ForCausalLM",
        {
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 12,
            "n_routed_experts": 16,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
            "moe_intermediate_size": 24,
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.5,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 512,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        },
        make_model=_tiny_deepseek,
    ),
}
