"""Llama 4's text decoder (`Llama4ForCausalLM`; the text part of Scout and Maverick).

Per layer, as transformers' `modeling_llama4.py` (HF names; q/k/v and gate/up packed):
- pre-norm blocks (RMSNorm), residual adds as Llama's;
- attention: `no_rope_layers[i]` says whether layer i rotates (default: every fourth layer
  does not, NoPE); `layer_types[i]` whether it is chunked local (`attention_chunk_size`, keys
  of the query's own chunk only) or global. Rotary layers L2-normalize q and k per head when
  `use_qk_norm` (no weight); NoPE layers scale q by `log1p(floor((p + 1) / floor_scale)) *
  attn_scale + 1` at position p when `attn_temperature_tuning`;
- the rotary is interleaved (consecutive pairs turn, HF's complex multiply). The checkpoint's
  q/k rows of the rotary layers are permuted on load (`[x0, x1, x2, x3, ...]` ->
  `[x0, x2, ..., x1, x3, ...]` per head), which turns it into the core's half-split rotary: q.k
  is the same sum over the same pairs and the L2 norm does not see the order, so the layers run
  the core's rotary, KV store and fused decode kernels unchanged;
- feed-forward: a dense SwiGLU of `intermediate_size_mlp`, or on `moe_layers` (every
  `interleave_moe_layer_step`-th layer) `Llama4Moe`: a router picks `num_experts_per_tok`
  experts (top-k logits, sigmoid scores), each chosen expert's input is the token scaled by its
  score (transformers scales inputs, not outputs), plus a shared expert of the same width.
The experts' stacked checkpoint tensors (`experts.gate_up_proj [E, H, 2I]`, `experts.down_proj
[E, I, H]`) are transposed on load into the core's `FusedMoE` layout; per-expert tensors load by
`expert_modules_mapping`.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.layers.moe import HF_EXPERT_MAPPING, FusedMoE, Router, RouterConfig
from polymodal.llm_core.layers.norm import DeferredNorm, RMSNorm, add_norm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP, LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig

# a q/k projection tensor of a decoder layer (any of transformers' prefixes; not the tower's)
_QK_TENSOR = re.compile(
    r"^(?:language_model\.)?model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.[qk]_proj\."
)
_STACKED_EXPERTS = re.compile(r"\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' `Llama4TextL2Norm`: RMS-normalize the last dim in fp32, no weight."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def halves_order(rows: int, head_dim: int) -> torch.Tensor:
    """Row order turning interleaved rotary pairs into the half-split layout, head by head:
    new row `h * d + i` is old row `h * d + 2i`, new row `h * d + d/2 + i` old `h * d + 2i + 1`."""
    within = torch.arange(head_dim).view(head_dim // 2, 2).t().flatten()  # [0, 2, .., 1, 3, ..]
    heads = torch.arange(rows // head_dim)[:, None] * head_dim
    return (heads + within).flatten()


class Llama4Attention(nn.Module):
    """Self-attention of one layer (see the module docstring): rotary + chunked mask + L2 q/k
    norm, or NoPE + global + temperature tuning, as the config says for `layer_idx`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend):
        super().__init__()
        text = cfg.text_config
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        bias = bool(getattr(text, "attention_bias", False))
        sizes = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        self.qkv_proj = PackedLinear(cfg.hidden_size, sizes, bias=bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bias)
        self.use_rope = bool(text.no_rope_layers[layer_idx])
        self.qk_norm_eps = cfg.rms_norm_eps if text.use_qk_norm and self.use_rope else None
        self.temperature_tuning = bool(text.attn_temperature_tuning) and not self.use_rope
        chunk = text.attention_chunk_size
        chunked = text.layer_types[layer_idx] == "chunked_attention" and chunk is not None
        spec = AttentionSpec(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            Mask.CHUNKED if chunked else Mask.CAUSAL,
            chunk if chunked else None,
            rotary=rotary.spec if self.use_rope else None,
        )
        self.attn = AttentionLayer(spec, backend, rotary if self.use_rope else None)

    def forward(self, rope, q_scales, hidden, kv_cache, meta, residual=None):
        """`rope`: (cos, sin) of the positions; `q_scales`: `[num_tokens]` fp32 temperature
        factors (None unless a layer tunes); `hidden` / `residual` as Llama's `Attention`."""
        num_tokens = (hidden.h if isinstance(hidden, DeferredNorm) else hidden).shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm_eps is not None:
            # transformers normalizes after the rotary; a rotation keeps each pair's norm, so
            # before it is the same (and lets the decode kernel rotate)
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature_tuning:
            q = (q * q_scales[:, None, None]).to(q.dtype)
        out = self.attn(q, k, v, rope if self.use_rope else None, kv_cache, meta)
        return self.o_proj.fused(out, residual=residual)  # [num_tokens, hidden]


class Llama4Moe(nn.Module):
    """transformers' `Llama4TextMoe` (`router`, `experts`, `shared_expert`): each token's
    chosen experts run on the token scaled by their sigmoid score; the shared expert on the
    token itself."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        text = cfg.text_config
        self.top_k = text.num_experts_per_tok
        route = RouterConfig(self.top_k, renormalize=False, scoring="sigmoid")
        self.router = Router(cfg.hidden_size, text.num_local_experts, route)
        self.experts = FusedMoE(text.num_local_experts, cfg.hidden_size, text.intermediate_size)
        self.shared_expert = MLP(cfg)

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, DeferredNorm):  # the experts need the normalized rows whole
            x = x.materialize()
        weights, ids = self.router(x)  # fp32 sigmoid scores, expert ids: [T, top_k]
        unit = torch.ones_like(weights[:, :1])  # outputs are not weighted again
        out = self.shared_expert(x)
        for j in range(self.top_k):  # Llama 4 checkpoints take one expert a token
            scaled = x * weights[:, j : j + 1].to(x.dtype)  # as transformers, in the model dtype
            out = out + self.experts(scaled, unit, ids[:, j : j + 1])
        return out


class Llama4DecoderLayer(nn.Module):
    """Pre-norm block; a dense MLP may fold the residual add into its GEMV (Llama's), the MoE
    block's output is added by the next norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend):
        super().__init__()
        text = cfg.text_config
        self.self_attn = Llama4Attention(cfg, layer_idx, rotary, backend)
        if layer_idx in text.moe_layers:
            self.feed_forward = Llama4Moe(cfg)
        else:
            self.feed_forward = MLP(
                dataclasses.replace(cfg, intermediate_size=text.intermediate_size_mlp)
            )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, q_scales, hidden, residual, kv_cache, meta):
        x, residual = add_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(rope, q_scales, x, kv_cache, meta, residual)
        x, residual = add_norm(self.post_attention_layernorm, hidden, residual)
        ff = self.feed_forward
        return (ff(x, residual) if isinstance(ff, MLP) else ff(x)), residual


class Llama4TextModel(nn.Module):
    """Embedding, decoder layers and final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        text = cfg.text_config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(text, cfg.rotary_dim, max_positions)
        self.layers = nn.ModuleList(
            Llama4DecoderLayer(cfg, i, self.rotary, backend) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tuned = any(layer.self_attn.temperature_tuning for layer in self.layers)
        self.temperature = (float(text.floor_scale), float(text.attn_scale)) if tuned else None

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by the rotary layers
        q_scales = None
        if self.temperature is not None:  # [num_tokens] fp32, as transformers computes them
            floor_scale, attn_scale = self.temperature
            q_scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale))
            q_scales = q_scales * attn_scale + 1.0
        hidden, residual = inputs_embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, q_scales, hidden, residual, kv_cache, meta)
        x, _ = add_norm(self.norm, hidden, residual)
        return x.materialize() if isinstance(x, DeferredNorm) else x


class Llama4ForCausalLM(ModelBase):
    """The Llama 4 text decoder: `embed`, `forward`, `compute_logits`."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    expert_modules_mapping = HF_EXPERT_MAPPING
    weight_name_remap = [
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ]

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.attach_decoder(cfg, Llama4TextModel(cfg, backend, max_positions))

    def load_weights(self, named_tensors, source: str = "checkpoint") -> None:
        """The default loader, after the two layout changes the tables cannot say: rotary
        layers' q/k rows into half-split order, stacked experts transposed."""
        super().load_weights(self._core_layout(named_tensors, source), source)

    def _core_layout(self, named_tensors, source: str):
        no_rope = self.config.text_config.no_rope_layers
        for name, tensor in named_tensors:
            qk = _QK_TENSOR.match(name)
            if qk is not None and no_rope[int(qk.group(1))]:
                tensor = self._halves(name, tensor, source)
            elif _STACKED_EXPERTS.search(name) and tensor.dim() == 3:
                tensor = tensor.transpose(1, 2)  # [E, H, 2I] -> [E, 2I, H]; [E, I, H] -> [E, H, I]
            yield name, tensor

    def _halves(self, name: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
        """A rotary layer's q/k tensor with its output rows in half-split order: weights,
        biases and per-row scales; per-tensor and per-head-block scales need no change."""
        head_dim = self.config.head_dim
        rows = (
            self.config.num_heads if ".q_proj." in name else self.config.num_kv_heads
        ) * head_dim
        kind = name.rsplit(".", 1)[-1]
        if kind in ("input_scale", "weight_scale_inv") or tensor.numel() == 1:
            return tensor
        if kind in ("weight", "bias", "weight_scale") and tensor.shape[0] == rows:
            return tensor[halves_order(rows, head_dim)]
        raise ModelLoadError(
            f"{source}: tensor {name!r} {tuple(tensor.shape)}: Llama 4 reorders its rotary "
            "layers' q/k rows on load, which this tensor's layout (packed 4-bit?) does not allow"
        )


def _tiny_text() -> dict:
    """Four layers: chunked rotary x3 then a global NoPE one (transformers' default pattern),
    MoE on layers 1 and 3 (step 2) with 4 experts of 32 (one a token) + the shared expert,
    dense layers of 128; chunks of 8 tokens (shorter than the test prompts) and a temperature
    floor of 4 tokens, so every feature acts within a short prompt."""
    return {
        "num_hidden_layers": 4,
        "head_dim": 16,
        "intermediate_size": 32,
        "intermediate_size_mlp": 128,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 8,
        "floor_scale": 4,
        "attn_scale": 0.5,
    }


TINY_CONFIGS = {"llama4": TinyConfig("Llama4ForCausalLM", _tiny_text())}
