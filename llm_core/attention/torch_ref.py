"""Reference attention backend in plain torch: correct on CPU and CUDA, not fast."""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    """Gathers each sequence's keys/values through its block table and runs masked SDPA."""

    name = "torch"

    def fuses_rope_decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether `rope_decode` (rotary + KV store + decode in one kernel) exists: not here."""
        return False

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Write new keys/values `[num_tokens, kv_heads, head_dim]` into their cache slots."""
        block_size = kv_cache.shape[2]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        blocks, offsets = slots // block_size, slots % block_size
        kv_cache[0, blocks, offsets] = k[keep].to(kv_cache.dtype)
        kv_cache[1, blocks, offsets] = v[keep].to(kv_cache.dtype)

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of `q [num_tokens, heads, head_dim]` over each sequence's cache."""
        block_size = kv_cache.shape[2]
        out = torch.empty_like(q)
        query_lens = meta.query_lens_cpu or (meta.query_start_loc.diff()).tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
            if q_len == 0:
                continue
            n_blocks = (seq_len + block_size - 1) // block_size
            blocks = meta.block_tables[s, :n_blocks].long()
            # [n_blocks, block_size, kv_heads, head_dim] -> [seq_len, kv_heads, head_dim]
            k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
            v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
            q_s = q[start : start + q_len]
            out[start : start + q_len] = _attend(q_s, k, v, seq_len - q_len, scale, sliding_window)
            start += q_len
        return out

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
        """Attention within each segment `cu_seqlens[i]:cu_seqlens[i+1]` (encoders, prefill)."""
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi == lo:
                continue
            offset = 0 if causal else None
            out[lo:hi] = _attend(q[lo:hi], k[lo:hi], v[lo:hi], offset, scale, None)
        return out


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int | None,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q [q_len, heads, d], k/v [kv_len, kv_heads, d]; query i sits at position q_offset + i.

    `q_offset=None` means no causal mask (bidirectional, for encoders).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:  # GQA: repeat each kv head for its group of query heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    mask = None
    if q_offset is not None:
        q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + q_offset
        k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
    # SDPA wants [heads, len, d]; compute in the query dtype
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1).to(q.dtype),
        v.transpose(0, 1).to(q.dtype),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1)
