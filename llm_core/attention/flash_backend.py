"""flash-attn backend (used when the `flash_attn` package is installed; CUDA, fp16/bf16 only).

flash-attn 2 reads a paged KV cache only when the page size is a multiple of 256, so with the
default 16-token pages paged attention stays on the Triton kernels; encoder `varlen_attention`
(the Qwen2.5-VL tower's windows and full attention) always uses `flash_attn_varlen_func`.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend

FLASH_PAGE_MULTIPLE = 256  # flash-attn 2's paged-KV constraint
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    """True when `flash_attn` imports (it needs CUDA)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class FlashAttnBackend(TritonAttentionBackend):
    """flash-attn where it applies, the Triton kernels elsewhere (same interface and semantics)."""

    name = "flash"

    def __init__(self, decode_splits: int | None = None) -> None:
        if not flash_attn_available():
            raise ImportError("the 'flash' attention backend needs the flash_attn package")
        super().__init__(decode_splits)

    def fuses_rope_decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Only where decode stays on the Triton kernel; flash-attn's own decode keeps the
        rotary and the KV store as kernels of their own."""
        return super().fuses_rope_decode(q, kv_cache) and not self._uses_flash(q, kv_cache)

    @staticmethod
    def _uses_flash(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return (
            kv_cache.shape[2] % FLASH_PAGE_MULTIPLE == 0
            and q.dtype in _FLASH_DTYPES
            and kv_cache.dtype == q.dtype  # an FP8 cache stays on the Triton kernels
        )

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        kv_scales: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Attention over the paged cache; flash-attn when pages are 256-multiples and the mask
        is causal or a sliding window without soft-cap (else the Triton kernels)."""
        ranges = meta.media_key_ranges is not None  # flash-attn has no per-query key ranges
        if not self._uses_flash(q, kv_cache) or not _flash_mask(spec) or ranges:
            return super().paged_attention(q, kv_cache, meta, spec, kv_scales)
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        # flash-attn's causal mask is bottom-right aligned, like ours; window keeps w keys.
        window = (-1, -1) if spec.mask == Mask.CAUSAL else (spec.window - 1, 0)
        scale = spec.scale
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, page, kv_heads, head_dim]
        if meta.is_decode:  # [num_seqs, 1, heads, head_dim]; graph-safe (no host reads)
            out = flash_attn_with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                block_table=meta.block_tables, softmax_scale=scale, causal=True,
                window_size=window,
            )  # fmt: skip
            return out.squeeze(1)
        cu_seqlens_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(
            q, k_cache, v_cache, meta.query_start_loc, cu_seqlens_k, meta.max_query_len,
            meta.max_seq_len, softmax_scale=scale, causal=True, window_size=window,
            block_table=meta.block_tables,
        )  # fmt: skip

    def varlen_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        scale: float,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attention within each segment `cu_seqlens[i]:cu_seqlens[i+1]` via flash-attn."""
        if q.dtype not in _FLASH_DTYPES:
            return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal)
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal
        )


def _flash_mask(spec: AttentionSpec) -> bool:
    """Masks flash-attn's paged path takes here: causal or sliding, no soft-cap."""
    return spec.mask in (Mask.CAUSAL, Mask.SLIDING) and spec.softcap is None
