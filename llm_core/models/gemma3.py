"""Gemma 3 (text): local sliding-window and global layers (5:1 by default, from `layer_types`)
with a rotary base each (`rope_parameters` per layer type), embeddings scaled by
sqrt(hidden), four (1 + w) RMSNorms per layer (input, post-attention, pre- and
post-feed-forward), q/k norms, GELU-tanh gated MLP, `query_pre_attn_scalar` as the attention
scale and the final logit soft-cap. HF parameter names; q/k/v and gate/up packed.

transformers' Gemma 3 does not pass `attn_logit_softcapping` to its attention (Gemma 2 does):
neither do we. `use_bidirectional_attention` (EmbeddingGemma) is not supported.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.spec import AttentionSpec
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import UnsupportedModelError
from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.layers.norm import DeferredNorm, GemmaRMSNorm, sandwich_norm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig


class Gemma3Attention(nn.Module):
    """q/k/v projection, per-head (1 + w) RMSNorm of q and k, rotary of the layer's type."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend):
        super().__init__()
        text = cfg.text_config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        sizes = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        bias = bool(getattr(text, "attention_bias", False))
        self.qkv_proj = PackedLinear(cfg.hidden_size, sizes, bias=bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        spec = AttentionSpec.from_window(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            text.query_pre_attn_scalar**-0.5,
            cfg.sliding_windows[layer_idx],
            rotary=rotary.spec,
        )
        self.attn = AttentionLayer(spec, backend, rotary)

    def forward(self, rope, x, kv_cache, meta, residual, post_norm):
        """`x` as `Linear.forward` takes it; returns o_proj's output, or with the GEMV the
        stream after it: `residual + post_norm(out)` (`Linear.fused`, `sandwich_norm`)."""
        num_tokens = (x.h if isinstance(x, DeferredNorm) else x).shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, rope, kv_cache, meta, (self.q_norm, self.k_norm))  # (folded
        # into the decode kernel, else `qk_norm`: in place on CUDA)
        return self.o_proj.fused(out, residual=residual, post_norm=post_norm)


class Gemma3MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)) with gate and up packed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        act = cfg.text_config.hidden_activation
        if act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"Gemma 3 with hidden_activation {act!r}")
        sizes = {0: cfg.intermediate_size, 1: cfg.intermediate_size}
        self.gate_up_proj = PackedLinear(cfg.hidden_size, sizes, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, residual, post_norm):
        """As `Gemma3Attention.forward`: down's output, or the stream after it (on the GEMV
        GELU-tanh * up applied as down loads x, too)."""
        return self.down_proj.fused(self.gate_up_proj(x), residual=residual, silu_mul=True,
                                    post_norm=post_norm, gelu_tanh=True)  # fmt: skip


class Gemma3DecoderLayer(nn.Module):
    """Sandwich norms: each block's output is normalized before it joins the residual stream.
    A block's post-norm, the add and the next block's pre-norm are one `sandwich_norm`; the
    MLP's post-norm is left to the next layer (or the final norm), which fuses it so. With the
    one-row GEMV the post-norm and the add fold into the block's last GEMV and the pre-norm
    into the next block's first (no norm kernel between them)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend):
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, layer_idx, rotary, backend)
        self.mlp = Gemma3MLP(cfg)
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, rope, hidden, residual, kv_cache, meta, post_norm=None):
        """`hidden`: the embeddings (`residual` None), else the previous layer's MLP output
        before its post-feed-forward norm (`post_norm`). Returns this layer's MLP output, not
        yet normalized (`post_feedforward_layernorm`) nor added to the returned `residual`
        (or, folded, an `AddedResidual` with both done)."""
        if residual is None:
            x, residual = self.input_layernorm(hidden), hidden
        else:
            x, residual = sandwich_norm(post_norm, self.input_layernorm, hidden, residual)
        attn = self.self_attn(rope, x, kv_cache, meta, residual, self.post_attention_layernorm)
        x, residual = sandwich_norm(
            self.post_attention_layernorm, self.pre_feedforward_layernorm, attn, residual
        )
        return self.mlp(x, residual, self.post_feedforward_layernorm), residual


class Gemma3TextModel(nn.Module):
    """Scaled embeddings, layers with a rotary per layer type, final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        text = cfg.text_config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = cfg.hidden_size**0.5
        self.layer_types = list(text.layer_types)
        self.rotaries = nn.ModuleDict(
            {
                kind: RotaryEmbedding(text, cfg.head_dim, max_positions, layer_type=kind)
                for kind in sorted(set(self.layer_types))
            }
        )
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, i, self.rotaries[kind], backend)
            for i, kind in enumerate(self.layer_types)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        # HF multiplies by the scale rounded to the weights' dtype
        return embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        # cos/sin once per rotary (local and global bases), shared by the layers of its type
        ropes = {kind: rotary.cos_sin(positions) for kind, rotary in self.rotaries.items()}
        hidden, residual, post_norm = inputs_embeds, None, None
        for layer, kind, kv_cache in zip(self.layers, self.layer_types, kv_caches):
            hidden, residual = layer(ropes[kind], hidden, residual, kv_cache, meta, post_norm)
            post_norm = layer.post_feedforward_layernorm
        x = sandwich_norm(post_norm, self.norm, hidden, residual)[0]
        return x.materialize() if isinstance(x, DeferredNorm) else x


class Gemma3ForCausalLM(ModelBase):
    """Gemma 3 text decoder: `embed`, `forward`, `compute_logits` (soft-capped logits)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    # the text model of a Gemma3ForConditionalGeneration checkpoint (v5 layout)
    weight_name_remap = [("model.language_model.", "model.")]

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = Gemma3TextModel(cfg, backend, max_positions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.final_softcap = getattr(cfg.text_config, "final_logit_softcapping", None)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_parameters = {"lm_head.weight": "model.embed_tokens.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)  # [num_tokens, hidden]

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.model(positions, inputs_embeds, kv_caches, meta)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:  # in the logits' dtype, as HF
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


TINY_CONFIGS = {
    # 6 layers: five local (window 8) then a global one, as Gemma 3 lays them out; a global
    # rotary with linear scaling, a custom attention scale, a final soft-cap, tied embeddings
    "gemma3": TinyConfig(
        "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 6,
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 5.0,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        },
    ),
}
