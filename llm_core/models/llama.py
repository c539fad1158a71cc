"""The Llama family decoder: Llama, Mistral, Qwen2, Qwen3 (q/k norm), Phi-3 (fused checkpoint).

Differences between the families are config flags (bias, q/k norm, sliding windows, partial
rotary, M-RoPE sections), not subclasses. Parameter names are HF's, with q/k/v and gate/up
packed into one matmul each (`packed_modules_mapping`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.spec import AttentionSpec
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.layers.norm import DeferredNorm, RMSNorm, add_norm
from polymodal.llm_core.layers.parallel import column, local_vocab, row, vocab, vocab_embedding
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.tiny import TinyConfig, sentence_transformers_files
from polymodal.llm_core.tensor_parallel import current_tp, split_evenly, split_heads


@dataclass(frozen=True)
class Flavor:
    """What differs between the family's architectures, from the model class's flags."""

    qkv_bias: bool
    qk_norm: bool
    o_bias: bool = False


class Attention(nn.Module):
    """Self-attention over the paged KV cache; the backend is handed in, never global.

    Under tensor parallelism (`current_tp()`) it holds this rank's heads: q/k/v column-split by
    heads (kv heads replicated when fewer than ranks), o row-split with an all-reduce."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        rotary: RotaryEmbedding | None,
        backend,
        flavor: Flavor,
    ):
        super().__init__()
        tp = current_tp()
        heads = split_heads(cfg.num_heads, cfg.num_kv_heads, tp)
        d = self.head_dim = cfg.head_dim
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        sizes = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        kv_full = cfg.num_kv_heads * d
        qkv_split = column(
            tp,
            {"q": heads.q_start * d, "k": heads.kv_start * d, "v": heads.kv_start * d},
            {"q": cfg.num_heads * d, "k": kv_full, "v": kv_full},
        )
        self.qkv_proj = PackedLinear(cfg.hidden_size, sizes, flavor.qkv_bias, parallel=qkv_split)
        o_split = row(tp, heads.q_start * d)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=flavor.o_bias, parallel=o_split)
        if flavor.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = flavor.qk_norm
        spec = AttentionSpec.from_window(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            cfg.sliding_windows[layer_idx],
            rotary=None if rotary is None else rotary.spec,  # None: a NoPE layer
        )
        self.attn = AttentionLayer(spec, backend, rotary)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        hidden,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        residual: torch.Tensor | None = None,
    ):
        """rope: (cos, sin) `[num_tokens, rotary_dim / 2]` from `RotaryEmbedding.cos_sin`;
        `hidden` as `Linear.forward` takes it; `residual`: the stream o_proj's output is added to
        next (asked of `Linear.fused`: the GEMV folds it in)."""
        num_tokens = (hidden.h if isinstance(hidden, DeferredNorm) else hidden).shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else None  # (folded in decode)
        out = self.attn(q, k, v, rope, kv_cache, meta, norms)  # [num_tokens, heads * head_dim]
        # [num_tokens, hidden]; or the add folded in (an AddedResidual, see Linear.fused)
        return self.o_proj.fused(out, residual=residual)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up packed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tp, full = current_tp(), cfg.intermediate_size
        start, inner = split_evenly(full, tp, "intermediate_size")  # this rank's features
        sizes = {0: inner, 1: inner}
        split = column(tp, {0: start, 1: start}, {0: full, 1: full})
        self.gate_up_proj = PackedLinear(cfg.hidden_size, sizes, bias=False, parallel=split)
        down_split = row(tp, start)
        self.down_proj = Linear(inner, cfg.hidden_size, bias=False, parallel=down_split)

    def forward(self, x, residual: torch.Tensor | None = None):
        """`x` as `Linear.forward` takes it; `residual` as `Linear.fused` (may fold into down)."""
        # few-row decode on the GEMV: SiLU*mul applied as it loads x, the residual add folded
        return self.down_proj.fused(self.gate_up_proj(x), residual=residual, silu_mul=True)


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is threaded through so add+norm can fuse."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend, flavor: Flavor
    ):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rotary, backend, flavor)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        """Returns (this block's output, the residual stream it adds to). At one row with the
        GEMV the adds are done in the GEMVs and the norms deferred to the next (norm.py)."""
        x, residual = add_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(rope, x, kv_cache, meta, residual)
        x, residual = add_norm(self.post_attention_layernorm, hidden, residual)
        return self.mlp(x, residual), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, flavor: Flavor):
        super().__init__()
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size, current_tp())
        self.rotary = rotary = RotaryEmbedding(
            cfg.text_config, cfg.rotary_dim, max_positions, cfg.mrope_section
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rotary, backend, flavor) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        hidden, residual = inputs_embeds, None
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by every layer
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        x, _ = add_norm(self.norm, hidden, residual)
        return x.materialize() if isinstance(x, DeferredNorm) else x


class LlamaForCausalLM(ModelBase):
    """The decoder core's model interface: `embed`, `forward`, `compute_logits`."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # transformers v5 nests the text model of multimodal checkpoints
    weight_name_remap = [("model.language_model.", "model.")]
    # Flavour flags of the family's architectures (subclasses below): q/k/v and o biases (None:
    # the config's `attention_bias`), RMSNorm of q and k per head.
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False
    supports_tensor_parallel = True  # checked on each class itself (see ModelBase)

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend, max_positions, self.flavor(cfg))
        tp = current_tp()
        self.lm_head = Linear(
            cfg.hidden_size,
            local_vocab(cfg.vocab_size, tp),
            bias=False,
            parallel=vocab(tp, cfg.vocab_size),
        )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_parameters = {"lm_head.weight": "model.embed_tokens.weight"}

    def flavor(self, cfg: ModelConfig) -> Flavor:
        """The class's flags; a bias left None follows the config's `attention_bias`."""
        config_bias = bool(getattr(cfg.text_config, "attention_bias", False))
        qkv_bias = config_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = config_bias if self.o_bias is None else self.o_bias
        return Flavor(qkv_bias, self.qk_norm, o_bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [num_tokens, hidden]

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.model(positions, inputs_embeds, kv_caches, meta)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 (and Qwen2-VL's text model): q/k/v always carry biases, o_proj none."""

    qkv_bias = True
    o_bias = False
    supports_tensor_parallel = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: RMSNorm on q and k per head, before the rotary."""

    qk_norm = True
    supports_tensor_parallel = True


TINY_CONFIGS = {
    "llama": TinyConfig("LlamaForCausalLM", {"head_dim": 16}),
    "mistral": TinyConfig("MistralForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "qwen2": TinyConfig("Qwen2ForCausalLM"),
    "qwen3": TinyConfig("Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": TinyConfig("Phi3ForCausalLM"),
    # Qwen3-Embedding's layout: causal LM weights, sentence-transformers' last-token pooling +
    # Normalize; and a bare Qwen3Model checkpoint (no files: last token + normalize)
    "qwen3_embed": TinyConfig(
        "Qwen3ForCausalLM", {"head_dim": 16}, write_extra=sentence_transformers_files("lasttoken")
    ),
    "qwen3_model_embed": TinyConfig("Qwen3Model", {"head_dim": 16}),
    "qwen2_model_embed": TinyConfig("Qwen2Model"),
    "llama_model_embed": TinyConfig("LlamaModel", {"head_dim": 16}),
    "mistral_model_embed": TinyConfig("MistralModel", {"head_dim": 16}),
}
