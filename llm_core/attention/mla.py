"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache: `MLAAttention`.

Per token the cache keeps one vector, `[latent c (kv_lora_rank) | rotated k_pe (rope dim)]`
(the `mla` KV spec: one plane, one "head"). The keys and values of head h are
`k_h = [W_UK_h c | k_pe]`, `v_h = W_UV_h c`, with `W_UK`, `W_UV` the two halves of each head's
rows of `kv_b_proj` (`[heads * (nope + v), rank]`).

- Prefill (any step that is not pure decode) runs the *expanded* form: each sequence's cached
  latents go through `kv_b_proj` into full per-head keys and values, and the backend's paged
  attention runs on them (a temporary page table over the step's sequences; values padded to
  the key head size, which the kernels need).
- Decode runs the *absorbed* form: `W_UK` is folded into the query (`q_lat_h = W_UK_h^T q_nope_h`,
  so `q_h . k_h = [q_lat_h | q_pe_h] . [c | k_pe]`), attention reads the latent cache itself as
  keys (rank + rope) and values (rank), shared by every head (MQA), and `W_UV` is applied to
  the output. The Triton kernel (`triton_mla.py`) on the Triton backend, torch elsewhere.

DeepSeek's rotary is interleaved (`rope_interleave`): q_pe and k_pe are de-interleaved
(`[x0, x2, ..] | [x1, x3, ..]`) and then rotated neox style, as transformers does; the cached
k_pe stays in that layout (q . k is unchanged by the shared permutation).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.spec import AttentionSpec
from polymodal.llm_core.host_copy import upload
from polymodal.llm_core.kv_cache_spec import MLA, KVCacheSpec
from polymodal.llm_core.layers import fused_ops


class MLAAttention(AttentionLayer):
    """`forward(q, latent, k_pe, rope, kv_cache, meta, kv_b_proj) -> [T, heads * v_head_dim]`.

    q `[T, heads, nope + rope]` (unrotated), latent `[T, rank]` (normalized), k_pe `[T, rope]`
    (unrotated); `kv_b_proj` the layer's up-projection (a `Linear`, owned by the model)."""

    def __init__(self, num_heads, nope_dim, rope_dim, v_head_dim, rank, scale, backend, rotary,
                 interleaved: bool = True):  # fmt: skip
        # the absorbed form's view: one shared kv head of rank + rope dims, values of `rank`
        spec = AttentionSpec(num_heads, 1, rank + rope_dim, scale, v_head_dim=rank,
                             rotary=rotary.spec)  # fmt: skip
        super().__init__(spec, backend, rotary)
        self.num_heads, self.nope_dim, self.rope_dim = num_heads, nope_dim, rope_dim
        self.v_head_dim, self.rank, self.scale = v_head_dim, rank, scale
        self.interleaved = interleaved
        # the expanded form: per-head keys and values (padded) for the backend's attention
        dim = max(nope_dim + rope_dim, v_head_dim)
        self.expanded_spec = AttentionSpec(num_heads, num_heads, dim, scale)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(MLA, None, 1, self.rank + self.rope_dim)

    def forward(self, q, latent, k_pe, rope, kv_cache, meta: AttentionMetadata, kv_b_proj):
        num_tokens = q.shape[0]
        meta = meta.group(self.kv_group)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        k_pe = k_pe.reshape(num_tokens, 1, self.rope_dim)
        if self.interleaved:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe, k_pe = self.rotary.apply(rope, q_pe.contiguous(), k_pe.contiguous())
        store_latent(torch.cat([latent, k_pe.view(num_tokens, -1)], -1), kv_cache, meta)
        if meta.is_decode:
            out = self._absorbed_decode(q_nope, q_pe, kv_cache, meta, kv_b_proj.weight)
        else:
            out = self._expanded_prefill(q_nope, q_pe, kv_cache, meta, kv_b_proj)
        return out.reshape(num_tokens, -1)  # [T, heads * v_head_dim]

    def _absorbed_decode(self, q_nope, q_pe, kv_cache, meta, kv_b_weight) -> torch.Tensor:
        w = kv_b_weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H, nope, r], [H, v, r]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, r]
        q_cat = torch.cat([q_lat, q_pe], dim=-1)  # [T, H, r + rope]
        if self.backend.name == "triton":
            from polymodal.llm_core.attention.triton_mla import mla_decode

            out_lat = mla_decode(q_cat, kv_cache[0], meta.block_tables, meta.seq_lens,
                                 self.rank, self.scale)  # fmt: skip
        else:
            out_lat = mla_decode_reference(q_cat, kv_cache[0], meta, self.rank, self.scale)
        return torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _expanded_prefill(self, q_nope, q_pe, kv_cache, meta, kv_b_proj) -> torch.Tensor:
        heads, nope, rope, v_dim = self.num_heads, self.nope_dim, self.rope_dim, self.v_head_dim
        dim = self.expanded_spec.head_dim
        page = kv_cache.shape[2]
        blocks, tables = _step_blocks(meta, page)
        latents = kv_cache[0, blocks].reshape(-1, self.rank + rope)  # [blocks * page, r + rope]
        kv = kv_b_proj(latents[:, : self.rank]).view(-1, heads, nope + v_dim)
        k = torch.cat([kv[..., :nope], latents[:, None, self.rank :].expand(-1, heads, rope)], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = (_pad_last(t, dim) for t in (q, k, kv[..., nope:]))
        expanded = torch.stack([k, v]).view(2, blocks.shape[0], page, heads, dim)
        meta = replace(meta, block_tables=tables, groups=None)
        out = self.backend.paged_attention(q, expanded, meta, self.expanded_spec)
        return out[..., :v_dim]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """`[x0, x1, x2, x3, ..]` -> `[x0, x2, .. | x1, x3, ..]` along the last dim."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def _step_blocks(meta: AttentionMetadata, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the physical blocks the step's sequences read, in order; a page table over them
    `[num_seqs, width]`). With host lengths only each sequence's own blocks; otherwise the whole
    width of the step's tables."""
    tables = meta.block_tables
    num_seqs, width = tables.shape
    if meta.seq_lens_cpu is None:
        blocks = tables.reshape(-1).long()
        local = torch.arange(num_seqs * width, device=tables.device, dtype=torch.int32)
        return blocks, local.view(num_seqs, width)
    widths = [-(-n // page) for n in meta.seq_lens_cpu]
    flat, local, start = [], [], 0
    for s, w in enumerate(widths):
        flat.extend(s * width + j for j in range(w))
        local.extend(list(range(start, start + w)) + [0] * (max(widths) - w))
        start += w
    flat_t, local_t = upload([flat, local], torch.int64, tables.device)
    blocks = tables.reshape(-1)[flat_t].long()
    return blocks, local_t.view(num_seqs, max(widths)).to(torch.int32)


def store_latent(entries: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write each token's `[latent | k_pe]` `[T, r + rope]` to its slot of the one-plane cache
    `[1, blocks, page, 1, r + rope]` (slot -1: not stored)."""
    if entries.is_cuda and fused_ops() is not None:  # Triton is there
        from polymodal.llm_core.attention.triton_mla import store_latent as triton_store

        triton_store(entries, kv_cache[0], meta.slot_mapping)
        return
    keep = meta.slot_mapping >= 0
    slots = meta.slot_mapping[keep]
    page = kv_cache.shape[2]
    kv_cache[0, slots // page, slots % page, 0] = entries[keep].to(kv_cache.dtype)


def mla_decode_reference(q, cache, meta: AttentionMetadata, rank: int, scale: float):
    """Absorbed decode in torch: q `[B, H, r + rope]` over each sequence's cached
    `[c | k_pe]` (`cache [blocks, page, 1, r + rope]`) -> `[B, H, r]` (softmax-weighted c)."""
    page = cache.shape[1]
    seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
    out = torch.empty(q.shape[0], q.shape[1], rank, dtype=q.dtype, device=q.device)
    for s, seq_len in enumerate(seq_lens):
        blocks = meta.block_tables[s, : -(-seq_len // page)].long()
        entries = cache[blocks].reshape(-1, cache.shape[-1])[:seq_len].to(q.dtype)  # [L, r+rope]
        scores = (q[s] @ entries.T).float() * scale  # [H, L]
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[s] = probs @ entries[:, :rank]
    return out
