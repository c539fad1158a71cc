"""Nemotron (Nemotron-3 / Minitron): pre-norm blocks with LayerNorm1P (LayerNorm whose weight
is stored as an offset from 1, with a bias), a squared-ReLU MLP without a gate, and partial
rotary (`partial_rotary_factor`, 0.5 by default). q/k/v packed; HF names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.activation import relu_squared
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import Attention, Flavor
from polymodal.llm_core.models.tiny import TinyConfig


class LayerNorm1P(nn.Module):
    """`F.layer_norm(x, weight + 1, bias)` in the input dtype, as HF computes it."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        """The identity: scale offsets and bias 0."""
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight + 1.0, self.bias, self.eps)


class NemotronMLP(nn.Module):
    """down(relu(up(x))^2)."""

    def __init__(self, cfg: ModelConfig, bias: bool):
        super().__init__()
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu_squared(self.up_proj(x)))


class NemotronDecoderLayer(nn.Module):
    """stream += attn(norm(stream)); stream += mlp(norm(stream)); the second add is left to
    the next layer (returned as (block output, stream))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend):
        super().__init__()
        text = cfg.text_config
        bias = bool(getattr(text, "attention_bias", False))
        self.self_attn = Attention(cfg, layer_idx, rotary, backend, Flavor(bias, False, bias))
        self.mlp = NemotronMLP(cfg, bool(getattr(text, "mlp_bias", False)))
        self.input_layernorm = LayerNorm1P(cfg.hidden_size, text.norm_eps)
        self.post_attention_layernorm = LayerNorm1P(cfg.hidden_size, text.norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        stream = hidden if residual is None else hidden + residual
        stream = stream + self.self_attn(rope, self.input_layernorm(stream), kv_cache, meta)
        return self.mlp(self.post_attention_layernorm(stream)), stream


class NemotronModel(nn.Module):
    """Embedding, layers, final LayerNorm1P (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # the first `rotary_dim` features of each head rotate (neox style), the rest pass
        self.rotary = RotaryEmbedding(cfg.text_config, cfg.rotary_dim, max_positions)
        self.layers = nn.ModuleList(
            NemotronDecoderLayer(cfg, i, self.rotary, backend) for i in range(cfg.num_layers)
        )
        self.norm = LayerNorm1P(cfg.hidden_size, cfg.text_config.norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by every layer
        hidden, residual = inputs_embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        return self.norm(hidden + residual)


class NemotronForCausalLM(ModelBase):
    """The Nemotron decoder: `embed`, `forward`, `compute_logits`."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.attach_decoder(cfg, NemotronModel(cfg, backend, max_positions))


TINY_CONFIGS = {
    # head_dim 16, half of it rotary (the config's default partial_rotary_factor 0.5)
    "nemotron": TinyConfig("NemotronForCausalLM", {"head_dim": 16, "norm_eps": 1e-5}),
}
