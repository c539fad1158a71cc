"""EXAONE 4: hybrid local (sliding-window, rotary) and global (no rotary, NoPE) layers from
`layer_types`, q/k RMSNorm, and post-norms only: each block reads the raw residual stream and
its output is normalized before it is added back. Projections, q/k norms and the SwiGLU MLP are
the Llama family's (HF names; q/k/v and gate/up packed). With `sliding_window` unset every
layer is global and rotary.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.norm import RMSNorm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP, Attention, Flavor, LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig


class Exaone4DecoderLayer(nn.Module):
    """stream += norm(attn(stream)); stream += norm(mlp(stream)). The second add is left to
    the next layer (returned as (block output, stream))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding | None, backend):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rotary, backend, Flavor(False, True))
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        stream = hidden if residual is None else hidden + residual
        attn = self.self_attn(rope, stream, kv_cache, meta)
        stream = stream + self.post_attention_layernorm(attn)
        return self.post_feedforward_layernorm(self.mlp(stream)), stream


class Exaone4Model(nn.Module):
    """Embedding, layers (rotary only where local, or everywhere without windows), final norm."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        text = cfg.text_config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(text, cfg.rotary_dim, max_positions)
        hybrid = getattr(text, "sliding_window", None) is not None
        self.layers = nn.ModuleList(
            Exaone4DecoderLayer(cfg, i, None if hybrid and window is None else self.rotary, backend)
            for i, window in enumerate(cfg.sliding_windows)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        rope = self.rotary.cos_sin(positions)  # once per forward, for the rotary layers
        hidden, residual = inputs_embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        return self.norm(hidden, residual)[0]


class Exaone4ForCausalLM(ModelBase):
    """The EXAONE 4 decoder: `embed`, `forward`, `compute_logits`."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.attach_decoder(cfg, Exaone4Model(cfg, backend, max_positions))


TINY_CONFIGS = {
    # 4 layers: three local (window 8, rotary) then a global NoPE one ("LLLG")
    "exaone4": TinyConfig(
        "Exaone4ForCausalLM",
        {"num_hidden_layers": 4, "sliding_window": 8, "sliding_window_pattern": 4},
    ),
}
