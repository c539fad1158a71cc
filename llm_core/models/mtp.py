"""DeepSeek-V3's multi-token-prediction layer as a draft head (vLLM's `{"method": "mtp"}` /
`"deepseek_mtp"`; drafted by eagle.py like an EAGLE head).

The checkpoint's layer `num_hidden_layers` (`model.layers.<N>.`) holds it: `enorm` and `hnorm`
(RMSNorms of the next token's embedding and of the target's last hidden state), `eh_proj` over
their concatenation, a DeepSeek-V3 decoder block (MLA and the MoE block, as the main layers'),
and `shared_head.norm` / `shared_head.head` for its logits. Position p takes the token at p + 1
(its embedding zeroed at position 0, as vLLM does) with the target's feature at p; later drafts
take the block's own output (before `shared_head.norm`). The embedding is the target's (the
layer's copy, `embed_tokens`, is not read); one layer serves every draft step.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.moe import HF_EXPERT_MAPPING
from polymodal.llm_core.layers.norm import AddedResidual, RMSNorm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3ForCausalLM
from polymodal.llm_core.models.eagle import DraftHead


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class DeepSeekMTPHead(DraftHead):
    """The MTP layer `layer` of a DeepSeek-V3 checkpoint over its `target` model; its feature
    is the target's last hidden state."""

    packed_modules_mapping = DeepseekV3ForCausalLM.packed_modules_mapping
    expert_modules_mapping = HF_EXPERT_MAPPING
    variant = "mtp"

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, target, layer: int):
        super().__init__(target)
        self.config = cfg
        h = cfg.hidden_size
        self.rotary = RotaryEmbedding(cfg.text_config, cfg.text_config.qk_rope_head_dim,
                                      max_positions)  # fmt: skip
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.mtp_block = DeepseekV3DecoderLayer(cfg, layer, self.rotary, backend)
        self.shared_head = SharedHead(cfg)
        prefix = f"model.layers.{layer}."
        block = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
        self.weight_name_remap = [(prefix + b, "mtp_block." + b) for b in block]
        self.weight_name_remap.append((prefix, ""))
        self.ignored_weights = ("^" + re.escape(prefix + "embed_tokens."),)

    def forward(self, positions, embeds, feature, kv_caches, meta):
        """(the block's output rows, the same as the next step's features)."""
        embeds = embeds.masked_fill((positions == 0)[:, None], 0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(feature.to(embeds.dtype))], -1))
        rope = self.rotary.cos_sin(positions)
        hidden, residual = self.mtp_block(rope, x, None, kv_caches[0], meta)
        out = hidden.h if isinstance(hidden, AddedResidual) else hidden + residual
        return out, out

    def greedy(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's greedy draft."""
        return self.shared_head.head(self.shared_head.norm(rows)).argmax(-1)
