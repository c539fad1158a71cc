"""`AttentionLayer`: the attention of one decoder layer after its projections, as its
`AttentionSpec` says: rotary (or none), KV store, paged attention; or, on a backend that folds
them (Triton on CUDA), all three in one decode kernel (`rope_decode`). Layers without a KV
cache (bidirectional encoders) attend over the step's own tokens. A cross-attention layer
(`Mask.CROSS`) stores the K/V of the encoder rows given this step (a request's first step) into
its cross group's cache and attends over each sequence's rows.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.kv_cache_spec import KVCacheSpec, kv_spec_of
from polymodal.llm_core.layers import fused_ops
from polymodal.llm_core.layers.norm import foldable_qk_norms, qk_norm


class AttentionLayer(nn.Module):
    """`forward(q, k, v, rope, kv_cache, meta) -> [num_tokens, heads * v_head_dim]`.

    q: `[num_tokens, heads, head_dim]`, k/v: `[num_tokens, kv_heads, head_dim]`, unrotated;
    `rope`: (cos, sin) from the layer's rotary module (`rotary.cos_sin(positions)`, computed once
    per forward and shared by layers with the same rotary), None for NoPE layers. A cross layer
    takes k/v of this step's new encoder rows `[rows, kv_heads, head_dim]` (stored at its group's
    `slot_mapping`), or None when no request writes its encoder rows this step.
    """

    def __init__(self, spec: AttentionSpec, backend, rotary: nn.Module | None = None):
        super().__init__()
        if (rotary is None) != (spec.rotary is None):
            raise ValueError("an attention layer has a rotary module iff its spec names one")
        self.spec = spec
        self.backend = backend
        self.rotary = rotary
        self.uses_kv_cache = spec.mask != Mask.BIDIRECTIONAL
        self.kv_group = 0  # which KV group's block tables it reads: set from the KV layout
        # An FP8 KV cache's (k_scale, v_scale): stored values are k / k_scale, v / v_scale.
        # Set by the engine (the checkpoint's scales, else 1.0); None for a 16-bit cache.
        self.kv_scales: tuple[float, float] | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        norms: tuple[nn.Module, nn.Module] | None = None,
    ) -> torch.Tensor:
        """`norms`: the (q_norm, k_norm) per-head RMSNorms to apply first (Qwen3, Gemma 3):
        folded into the decode kernel where it rotates, else one `qk_norm` kernel."""
        num_tokens = q.shape[0]
        meta = meta.group(self.kv_group)  # this layer's block tables and slots
        if self.fuse_rope(meta, q, kv_cache):  # rotary + KV store + attention in one kernel
            folded = norms and foldable_qk_norms(*norms, q)
            if norms and folded is None:
                q, k = qk_norm(*norms, q, k)
            out = self.backend.rope_decode(q, k, v, rope, kv_cache, meta, self.spec,
                                           self.kv_scales, folded)  # fmt: skip
            return out.reshape(num_tokens, -1)
        if norms:
            q, k = qk_norm(*norms, q, k)
        out = self.fresh_prefill(q, k, v, rope, kv_cache, meta)
        if out is not None:  # rotary + KV store + SDPA's padded copies in one launch
            return out.reshape(num_tokens, -1)
        if self.rotary is not None:
            q, k = self.rotary.apply(rope, q, k)
        if not self.uses_kv_cache:  # every prompt is whole in this step: attend in place
            out = self.backend.varlen_attention(
                q, k, v, meta.query_start_loc, meta.max_query_len, self.spec.scale, causal=False
            )
            return out.reshape(num_tokens, -1)
        if k is not None:
            self.backend.store_kv(k, v, kv_cache, meta.slot_mapping, self.kv_scales)
        out = self.backend.sdpa_prefill(q, k, v, kv_cache, meta, self.spec)
        if out is None:
            out = self.backend.paged_attention(q, kv_cache, meta, self.spec, self.kv_scales)
        return out.reshape(num_tokens, -1)  # [num_tokens, heads * head_dim]

    def kv_cache_spec(self) -> KVCacheSpec:
        """What this layer keeps in the KV cache (from its attention spec)."""
        return kv_spec_of(self.spec)

    def fresh_prefill(self, q, k, v, rope, kv_cache, meta: AttentionMetadata):
        """The backend's `fresh_prefill` (a fresh chunk on SDPA, rotated and stored on the way)
        where this layer keeps a KV cache and its rotary, if any, would run as that kernel's
        math; else None."""
        if not self.uses_kv_cache or k is None:
            return None
        if self.rotary is not None and not self.rotary.runs_fused(q):
            return None
        rope = rope if self.rotary is not None else None
        return self.backend.fresh_prefill(q, k, v, rope, kv_cache, meta, self.spec)

    def fuse_rope(self, meta: AttentionMetadata, q: torch.Tensor, kv_cache) -> bool:
        """Decode with a backend that rotates and stores inside its kernel, where the rotary
        would run as the CUDA kernel anyway (same numerics: fp32 math, one rounding)."""
        return (
            meta.is_decode
            and self.rotary is not None
            and fused_ops() is not None
            and self.backend.fuses_rope_decode(q, kv_cache)
        )
