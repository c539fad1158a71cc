"""EAGLE draft heads (vLLM's `{"method": "eagle" | "eagle3", "model": DIR}`): a one-layer Llama
decoder that drafts from the target's features instead of from tokens alone.

A feature row at position p pairs the token at p + 1 with the target's feature at p; the head's
output there predicts the token at p + 2, and its own output feature stands in for the
target's at the next draft step (EAGLE's feature-level autoregression).

- EAGLE (`eagle`, SafeAILab's EAGLE-1 heads, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): the
  target's feature is its last hidden state (after the final norm); `fc` maps `[embedding,
  feature]` (2 x hidden) to hidden; decoder layer 0 has no input norm; the output is the
  layer's output plus its residual, unnormed, read by the target's LM head (the head's own when
  the checkpoint has one).
- EAGLE-3 (`eagle3`, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): the target's feature is `fc`
  over three of its layers' residual streams (the inputs of layers `eagle_aux_hidden_state_
  layer_ids`, default 2, L / 2 and L - 3) concatenated (3 x the target's hidden); the one layer
  (`midlayer` in the checkpoint) normalises the embedding (`input_layernorm`) and the feature
  (`hidden_norm`) and attends over their concatenation (q/k/v take 2 x hidden); its output
  plus residual is the next feature, and the final `norm` of it feeds its own LM head over
  `draft_vocab_size` ids, mapped to the target's by `d2t` (target id = draft id + d2t[id]).

The embedding is always the target's. Weight names as the published checkpoints (and vLLM)
have them, with or without a `model.` prefix; `embed_tokens` and `t2d` are not read.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.linear import PackedLinear
from polymodal.llm_core.layers.norm import RMSNorm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP, Attention, DecoderLayer, Flavor, LlamaForCausalLM

VARIANTS = ("eagle", "eagle3")


def aux_layer_ids(head_config, num_target_layers: int) -> list[int]:
    """The target layers whose residual streams EAGLE-3 reads (their inputs), as vLLM picks
    them: the head config's `eagle_aux_hidden_state_layer_ids`, else (2, L / 2, L - 3)."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    if not ids:
        ids = [2, num_target_layers // 2, num_target_layers - 3]
    return list(ids)


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over `[input_layernorm(embedding),
    hidden_norm(feature)]`, the feature as the residual, then the MLP."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend, flavor: Flavor):
        super().__init__()
        self.self_attn = Attention(cfg, 0, rotary, backend, flavor)
        attn = self.self_attn
        sizes = {"q": attn.q_size, "k": attn.kv_size, "v": attn.kv_size}
        self.self_attn.qkv_proj = PackedLinear(2 * cfg.hidden_size, sizes, flavor.qkv_bias)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, embeds, feature, kv_cache, meta):
        """(the MLP's output, the residual stream it adds to)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(feature)], dim=-1)
        hidden = self.self_attn(rope, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(hidden, feature)
        return self.mlp(x), residual


class DraftHead(ModelBase):
    """A draft head over a target model: it embeds with the target's table and drafts from the
    target's features (`target` is not a submodule: its weights are the target's). The
    drafter's contract (eagle.py): `feature(hidden, aux)`, `forward(positions, embeds, feature,
    kv_caches, meta) -> (rows, next features)`, `greedy(rows)`."""

    supports_prefill_graphs = False
    supports_lora = False

    def __init__(self, target):
        super().__init__()
        self._target = [target]  # a list: not a submodule

    @property
    def target(self):
        return self._target[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed(input_ids)

    def feature(self, hidden: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """The target's feature rows from a step's outputs: its last hidden states."""
        return hidden


class EagleHead(DraftHead):
    """One EAGLE / EAGLE-3 head (for EAGLE without an LM head of its own, the target's
    `compute_logits` reads its rows)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    weight_name_remap = [("model.", ""), ("midlayer.", "layers.0.")]
    ignored_weights = (r"^(model\.)?embed_tokens\.", r"^t2d$")

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, variant: str, target,
                 tensor_names: set[str], target_hidden: int):  # fmt: skip
        super().__init__(target)
        self.config, self.variant = cfg, variant
        h = cfg.hidden_size
        bias = bool(getattr(cfg.text_config, "attention_bias", False))
        flavor = Flavor(bias, False, bias)
        self.rotary = rotary = RotaryEmbedding(cfg.text_config, cfg.rotary_dim, max_positions)
        names = {n.removeprefix("model.") for n in tensor_names}
        if variant == "eagle":
            self.layers = nn.ModuleList(
                DecoderLayer(cfg, i, rotary, backend, flavor) for i in range(cfg.num_layers)
            )
            self.layers[0].input_layernorm = nn.Identity()  # EAGLE's first layer has none
            self.fc = nn.Linear(2 * h, h, bias="fc.bias" in names)
        else:
            self.layers = nn.ModuleList([Eagle3Layer(cfg, rotary, backend, flavor)])
            self.fc = nn.Linear(3 * target_hidden, h, bias="fc.bias" in names)
            self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = None
        if "lm_head.weight" in names:
            vocab = getattr(cfg.text_config, "draft_vocab_size", None) or cfg.vocab_size
            self.lm_head = nn.Linear(h, vocab, bias=False)
        self.d2t = None  # draft id -> its offset to the target id
        if "d2t" in names:
            ids = torch.zeros(self.lm_head.out_features, dtype=torch.int64)
            self.d2t = nn.Parameter(ids, requires_grad=False)

    def feature(self, hidden: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """The target's feature rows from a step's outputs: its hidden state (EAGLE), or `fc`
        over the aux layers' residual streams (EAGLE-3)."""
        if self.variant == "eagle":
            return hidden
        return self.fc(torch.cat(aux, dim=-1).to(self.fc.weight.dtype))

    def forward(self, positions, embeds, feature, kv_caches, meta):
        """(rows for the LM head, the next step's feature rows) at each position."""
        rope = self.rotary.cos_sin(positions)
        if self.variant == "eagle":
            hidden = self.fc(torch.cat([embeds, feature.to(embeds.dtype)], dim=-1))
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
            out = hidden + residual
            return out, out
        hidden, residual = self.layers[0](rope, embeds, feature.to(embeds.dtype), kv_caches[0],
                                          meta)  # fmt: skip
        out, prenorm = self.norm(hidden, residual)
        return out, prenorm

    def greedy(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's greedy draft, as a target token id."""
        if self.lm_head is None:
            return self.target.compute_logits(rows).argmax(-1)
        ids = self.lm_head(rows).argmax(-1)
        return ids if self.d2t is None else ids + self.d2t[ids]
