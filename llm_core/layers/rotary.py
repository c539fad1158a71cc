"""Rotary position embedding (neox style, partial rotary, M-RoPE) with every HF rope scaling.

Inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` (linear, dynamic,
yarn, longrope, llama3), so each scaling matches the reference by construction. cos/sin are
precomputed once for every position: a step gathers rows, no trig on the hot path.
Known difference: "dynamic" is taken at its base length (equal to HF up to
`max_position_embeddings`); "longrope" picks the long factors per token at positions
>= `original_max_position_embeddings` (HF switches the whole forward once any token does).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.attention.spec import RotarySpec
from polymodal.llm_core.layers import fused_ops


def rope_parameters(text_config, layer_type: str | None = None) -> dict:
    """The rotary parameters (`rope_theta`, `rope_type`, scaling) of a config; a config with
    per-layer-type parameters (Gemma 3: `{"sliding_attention": ..., "full_attention": ...}`)
    gives those of `layer_type`."""
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    return dict(rope.get(layer_type) or {}) if layer_type is not None else rope


def _inv_freq(
    text_config, rotary_dim: int, long: bool = False, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    rope = rope_parameters(text_config, layer_type)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default" or rope_type == "mrope":
        base = rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
        exps = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (base**exps), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    with torch.device("cpu"):  # they build on "cpu" whatever device the model is built on
        if rope_type == "longrope" and long:
            original = getattr(text_config, "original_max_position_embeddings", None)
            original = original or rope.get("original_max_position_embeddings")
            return ROPE_INIT_FUNCTIONS[rope_type](
                text_config, "cpu", seq_len=original + 1, **kwargs
            )
        return ROPE_INIT_FUNCTIONS[rope_type](text_config, "cpu", **kwargs)


def _cos_sin(inv_freq: torch.Tensor, scaling: float, max_positions: int) -> torch.Tensor:
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float().to(t.device))  # [max_positions, rotary_dim / 2]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


class RotaryEmbedding(nn.Module):
    """`forward(positions, q, k)` rotates the first `rotary_dim` features of q and k.

    positions: [num_tokens] int64, or [3, num_tokens] for M-RoPE (temporal, height, width).
    q: [num_tokens, heads, head_dim], k: [num_tokens, kv_heads, head_dim].
    """

    def __init__(
        self,
        text_config,
        rotary_dim: int,
        max_positions: int,
        mrope_section=None,
        device=None,
        layer_type: str | None = None,
    ):
        """`layer_type` picks one set of a config's per-layer-type rotary parameters."""
        super().__init__()
        self.rotary_dim = rotary_dim
        self.mrope_section = list(mrope_section) if mrope_section else None
        rope = rope_parameters(text_config, layer_type)
        base = rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
        kind = "mrope" if self.mrope_section else "neox"
        self.spec = RotarySpec(float(base), rotary_dim, kind)  # what attention specs record
        inv_freq, scaling = _inv_freq(text_config, rotary_dim, layer_type=layer_type)
        cache = _cos_sin(inv_freq, scaling, max_positions)  # [max_positions, rotary_dim] fp32
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)
        self.long_from = None
        if rope.get("rope_type") == "longrope":
            self.long_from = getattr(text_config, "original_max_position_embeddings", None)
            long = _inv_freq(text_config, rotary_dim, long=True, layer_type=layer_type)
            long_cache = _cos_sin(*long, max_positions)
            self.register_buffer("long_cos_sin_cache", long_cache.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [num_tokens, rotary_dim / 2] (fp32)."""
        if self.mrope_section and self.long_from is None and fused_ops() and positions.is_cuda:
            return fused_ops().mrope_cos_sin(self.cos_sin_cache, positions, self.mrope_section)
        cos_sin = self.cos_sin_cache[positions]
        if self.long_from is not None:
            long = self.long_cos_sin_cache[positions]
            cos_sin = torch.where((positions >= self.long_from)[..., None], long, cos_sin)
        half = self.rotary_dim // 2
        cos, sin = cos_sin[..., :half], cos_sin[..., half:]
        if self.mrope_section is not None:
            # [3, T, half] -> [T, half]: frequency section i takes its angle from axis i
            cos = torch.cat([c[i] for i, c in enumerate(cos.split(self.mrope_section, -1))], -1)
            sin = torch.cat([s[i] for i, s in enumerate(sin.split(self.mrope_section, -1))], -1)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.apply(self.cos_sin(positions), q, k)

    def apply(self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """Rotate q and k with cos/sin from `cos_sin(positions)` (computed once per forward).

        On CUDA a fused Triton kernel rotates in place (fp32 math, one rounding); elsewhere
        the torch path rounds like HF.
        """
        cos, sin = cos_sin
        if self.runs_fused(q):
            return fused_ops().rotary_embedding(q, k, cos, sin)
        rotated_q = apply_rotary(q, cos, sin, self.rotary_dim)
        return rotated_q, apply_rotary(k, cos, sin, self.rotary_dim)

    @staticmethod
    def runs_fused(q: torch.Tensor) -> bool:
        """Whether `apply` rotates `q` with the Triton kernel (fp32 math, one rounding), which
        kernels that fold the rotary in reproduce bit for bit."""
        return q.is_cuda and fused_ops() is not None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int):
    """Neox-style rotation of x[..., :rotary_dim]; cos/sin [num_tokens, rotary_dim/2]."""
    cos = cos[:, None, :].to(x.dtype)  # broadcast over heads
    sin = sin[:, None, :].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
