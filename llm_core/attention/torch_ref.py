"""Reference attention backend in plain torch: correct on CPU and CUDA, not fast."""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.spec import AttentionSpec, Mask

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class TorchAttentionBackend:
    """Gathers each sequence's keys/values through its block table and runs masked SDPA."""

    name = "torch"

    def fuses_rope_decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether `rope_decode` (rotary + KV store + decode in one kernel) exists: not here."""
        return False

    def sdpa_prefill(self, q, k, v, kv_cache, meta: AttentionMetadata, spec: AttentionSpec):
        """A fast path for one long causal prefill chunk: none here (`paged_attention` runs it)."""
        return None

    def fresh_prefill(self, q, k, v, rope, kv_cache, meta: AttentionMetadata,
                      spec: AttentionSpec):  # fmt: skip
        """Rotary, KV store and attention of a fresh chunk at once: none here."""
        return None

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: tuple[float, float] | None = None,
    ) -> None:
        """Write new keys/values `[num_tokens, kv_heads, head_dim]` into their cache slots (an
        FP8 cache: divided by `kv_scales`, default 1.0, saturated to +-448)."""
        block_size = kv_cache.shape[2]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        blocks, offsets = slots // block_size, slots % block_size
        k, v = k[keep], v[keep]
        if kv_cache.dtype == FP8:
            k_scale, v_scale = kv_scales or (1.0, 1.0)
            k = (k.float() / k_scale).clamp(-FP8_MAX, FP8_MAX)
            v = (v.float() / v_scale).clamp(-FP8_MAX, FP8_MAX)
        kv_cache[0, blocks, offsets] = k.to(kv_cache.dtype)
        kv_cache[1, blocks, offsets] = v.to(kv_cache.dtype)

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        kv_scales: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Attention of `q [num_tokens, heads, head_dim]` over each sequence's cache, masked as
        `spec` says (causal / sliding / chunked / bidirectional, soft-capped logits); an FP8
        cache's keys and values are multiplied back by `kv_scales`."""
        if spec.mask == Mask.CROSS:
            return self._cross_attention(q, kv_cache, meta, spec, kv_scales)
        block_size = kv_cache.shape[2]
        out = torch.empty_like(q)
        query_lens = meta.query_lens_cpu or (meta.query_start_loc.diff()).tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        ranges = meta.media_key_ranges_cpu
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
            if q_len == 0:
                continue
            n_blocks = (seq_len + block_size - 1) // block_size
            blocks = meta.block_tables[s, :n_blocks].long()
            # [n_blocks, block_size, kv_heads, head_dim] -> [seq_len, kv_heads, head_dim]
            k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
            v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
            if kv_cache.dtype == FP8:  # dequantized in the query dtype
                k_scale, v_scale = kv_scales or (1.0, 1.0)
                k, v = k.to(q.dtype) * k_scale, v.to(q.dtype) * v_scale
            q_s = q[start : start + q_len]
            extra = None
            if ranges is not None:  # [q_len] each: media key ranges of these queries
                extra = tuple(
                    torch.tensor(r[start : start + q_len], device=q.device) for r in ranges
                )
            out[start : start + q_len] = _attend(q_s, k, v, seq_len - q_len, spec, extra)
            start += q_len
        return out

    def _cross_attention(self, q, kv_cache, meta: AttentionMetadata, spec, kv_scales):
        """Each query attends to its sequence's encoder rows `[lo, hi)` of `meta.cross_ranges`
        (none: zeros)."""
        block_size = kv_cache.shape[2]
        out = torch.zeros_like(q)
        query_lens = meta.query_lens_cpu or (meta.query_start_loc.diff()).tolist()
        rows = meta.seq_lens_cpu or meta.seq_lens.tolist()
        ranges = meta.cross_ranges_cpu or meta.cross_ranges.tolist()
        start = 0
        for s, (q_len, num_rows) in enumerate(zip(query_lens, rows)):
            lo = torch.tensor(ranges[0][start : start + q_len], device=q.device)
            hi = torch.tensor(ranges[1][start : start + q_len], device=q.device)
            if num_rows == 0 or not bool((hi > lo).any()):
                start += q_len
                continue
            blocks = meta.block_tables[s, : -(-num_rows // block_size)].long()
            k = kv_cache[0, blocks].flatten(0, 1)[:num_rows]  # [rows, kv_heads, head_dim]
            v = kv_cache[1, blocks].flatten(0, 1)[:num_rows]
            if kv_cache.dtype == FP8:
                k_scale, v_scale = kv_scales or (1.0, 1.0)
                k, v = k.to(q.dtype) * k_scale, v.to(q.dtype) * v_scale
            pos = torch.arange(num_rows, device=q.device)[None, :]
            seen = (pos >= lo[:, None]) & (pos < hi[:, None])  # [q_len, rows]
            some = seen.any(-1)  # queries that see nothing keep zeros
            cross = AttentionSpec(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.scale)
            out[start : start + q_len][some] = _attend(
                q[start : start + q_len][some], k, v, 0, cross, mask=seen[some]
            )
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
        mask = Mask.CAUSAL if causal else Mask.BIDIRECTIONAL
        spec = AttentionSpec(q.shape[1], k.shape[1], q.shape[2], scale, mask)
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi == lo:
                continue
            out[lo:hi] = _attend(q[lo:hi], k[lo:hi], v[lo:hi], 0, spec)
        return out


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int,
    spec: AttentionSpec,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [q_len, heads, d], k/v [kv_len, kv_heads, d]; query i sits at position q_offset + i
    and sees the keys `spec.mask` allows, plus those in `[extra[0][i], extra[1][i])` (media
    runs attended bidirectionally; still inside a sliding window or chunk). A given `mask`
    (bool [q_len, kv_len]) replaces the spec's."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:  # GQA: repeat each kv head for its group of query heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if mask is None and spec.mask != Mask.BIDIRECTIONAL:
        q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + q_offset
        k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
        mask = k_pos <= q_pos
        if extra is not None:
            mask = mask | ((k_pos >= extra[0][:, None]) & (k_pos < extra[1][:, None]))
        if spec.mask == Mask.SLIDING:
            mask &= k_pos > q_pos - spec.window
        elif spec.mask == Mask.CHUNKED:
            mask &= k_pos >= q_pos // spec.window * spec.window
    # [heads, len, d]; compute in the query dtype
    q, k, v = q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    if spec.softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=spec.scale
        )
        return out.transpose(0, 1)
    # soft-capped logits (as HF's eager attention: scale, cap, mask, fp32 softmax, cast)
    scores = torch.matmul(q, k.transpose(1, 2)) * spec.scale
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1)
