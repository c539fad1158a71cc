"""Paged decode attention in Triton: one query token per sequence, GQA-grouped, split-KV.

Grid `(num_seqs, num_kv_heads, num_splits)`. A program loads the queries of *all* heads that
share its kv head (padded to 16 rows so `tl.dot` can use tensor cores), so each K/V tile is read
from HBM once per kv head, not once per query head. With `num_splits > 1` (flash-decoding) each
program covers one contiguous slice of the context and writes a partial output plus its
log-sum-exp; the last split of a (sequence, kv head) to finish (an atomic arrival counter,
`llm_core/counters.py`) merges the slices, so decode is one launch. The slice length is derived
in-kernel from the sequence's real length, so the launch grid and buffers depend only on
shapes: CUDA-graph safe.

Given the step's unrotated q/k/v and their cos/sin (`NewTokens`), the kernel also does the
rotary and the KV store that otherwise run as two kernels before it: each program rotates its
query heads and its kv head's new key as it loads them (fp32 math, one rounding, as
`triton_ops.rotary_embedding` does), attends to the new key and value from registers, and the
first split writes them to the cache.

The mask is a constexpr `MASK` (`spec.Mask`: 0 causal, 1 sliding window, 2 chunked local, 4
cross; a decode query sees the keys of its window or chunk only; a cross query the encoder rows
`[lo, hi)` of its range, `seq_lens` and the table being the cross group's), `SOFTCAP` caps the
logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.attention.decode_tiles import (
    attend_tile,
    kv_offsets,
    merge_splits,
    norm_rotate,
    rotate,
)
from polymodal.llm_core.attention.spec import DECODE_METADATA, AttentionSpec, Mask
from polymodal.llm_core.attention.triton_store import fp8_scaled
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.norm import QKNorms

_LOG2E = 1.4426950408889634
# Split partials the merging program loads at once (A/B runs: scripts/device/gemma_s26.py)
MERGE_UNROLL = 4


class NewTokens(NamedTuple):
    """A decode step's new token per sequence, before rotary and before the KV store.

    k, v: `[num_seqs, kv_heads, head_dim]` (views of a packed qkv row are fine: unit last
    stride); cos, sin: fp32 `[num_seqs, rotary_dim / 2]` (neox style, the first `rotary_dim`
    features rotate); slot_mapping: each new key's cache slot (-1: padding, not stored).
    `norms`: the per-head RMSNorms of q and k before the rotary (`QKNorms`), or None.
    """

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    norms: QKNorms | None = None


# The block-table stride (a step's widest table) changes from step to step: not specialized on,
# so a new width never compiles a new variant in the middle of a run.
@triton.jit(do_not_specialize=["stride_bt"], do_not_specialize_on_alignment=DECODE_METADATA)
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, page_size, kv_heads, head_dim]
    v_cache_ptr,
    block_table_ptr,  # int32 [num_seqs, max_blocks]
    seq_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [num_seqs, num_heads, head_dim] (NUM_SPLITS == 1)
    part_out_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS, head_dim] (NUM_SPLITS > 1)
    part_lse_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS], log2 domain
    counter_ptr,  # int32 per (seq, kv head), zero between launches (NUM_SPLITS > 1)
    new_k_ptr,  # [num_seqs, kv_heads, head_dim] the step's keys, unrotated (ROPE_HALF > 0)
    new_v_ptr,  # [num_seqs, kv_heads, head_dim] the step's values (ROPE_HALF > 0)
    cos_ptr,  # fp32 [num_seqs, ROPE_HALF] (ROPE_HALF > 0)
    sin_ptr,
    slot_ptr,  # int [num_seqs] the new key's cache slot, -1: padding (ROPE_HALF > 0)
    q_norm_ptr,  # [head_dim] q's and k's RMSNorm weights (QK_NORM > 0)
    k_norm_ptr,
    norm_eps,
    range_lo_ptr,  # int32 [num_seqs] cross rows [lo, hi) each query sees (MASK 4)
    range_hi_ptr,
    qk_scale,  # softmax scale * log2(e)
    cap_log2,  # soft-cap * log2(e) (SOFTCAP)
    window,  # sliding window (MASK 1) or chunk size (MASK 2)
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_co,
    stride_ch,
    stride_ks,  # new_k's sequence and head strides (ROPE_HALF > 0)
    stride_kh,
    stride_vs,
    stride_vh,
    stride_rope,  # cos/sin row stride
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of 2 >= 16
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of 2
    BLOCK_N: tl.constexpr,  # keys per tile
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of 2
    MERGE_UNROLL: tl.constexpr,  # split partials a merge loads at once
    MIN_SPLIT_KEYS: tl.constexpr,  # keys per split at least, when the context is short
    MASK: tl.constexpr,  # 0 causal, 1 sliding window, 2 chunked local
    SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr,
    ROPE_HALF: tl.constexpr,  # 0: q is rotated and the new key stored; else rotary_dim // 2
    QK_NORM: tl.constexpr,  # (ROPE_HALF > 0) 0: q / k as given; 1: RMSNorm each head; 2: Gemma's
    USE_PDL: tl.constexpr,
    k_scale=1.0,  # FP8 cache: what the stored keys / values are divided by (k_scale also
    v_scale=1.0,  # folds into qk_scale)
    FP8_KV: tl.constexpr = False,
):
    # Before the PDL wait: everything but the newest key (and, with ROPE_HALF, the step's
    # q/k/v). The previous kernel (the KV store, or the qkv projection) writes only those; it
    # passed its own wait before this kernel could launch, so whatever the kernels before it
    # wrote (q by the rotary, older keys, cos/sin, the host's tables) is complete. q is read
    # past L1 (.cg).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if MASK == 1:  # the query at seq_len - 1 sees keys > seq_len - 1 - window
        lo = tl.maximum(seq_len - window, 0)
    if MASK == 2:  # ... and keys of its own chunk
        lo = ((seq_len - 1) // window) * window
    if MASK == 4:  # cross: the encoder rows of the query's range (empty: zeros)
        lo = tl.load(range_lo_ptr + seq)
        seq_len = tl.maximum(tl.minimum(tl.load(range_hi_ptr + seq), seq_len), lo)
    # Splits in use for this context (the grid has NUM_SPLITS for the longest one a graph may
    # see): a short context runs on one split, which writes the output with no merge.
    active = tl.minimum(NUM_SPLITS, tl.maximum(tl.cdiv(seq_len - lo, MIN_SPLIT_KEYS), 1))
    # This split's key range [start, end), tile-aligned relative to lo (empty when unused).
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, active), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + rows  # [BLOCK_G] query heads of this group
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    q_off = seq * stride_qs + heads[:, None] * stride_qh + dims[None, :]
    q_mask = row_mask[:, None] & dim_mask[None, :]
    if ROPE_HALF == 0 and MASK != 4:
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0, cache_modifier=".cg")
    if ROPE_HALF != 0:  # the rotary's cos/sin per feature (1, 0 past rotary_dim), pair partners
        lower = dims < ROPE_HALF
        rotated = dims < 2 * ROPE_HALF
        freq = tl.where(lower, dims, dims - ROPE_HALF)
        cos = tl.load(cos_ptr + seq * stride_rope + freq, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + seq * stride_rope + freq, mask=rotated, other=0.0).to(tl.float32)
        partner = tl.where(lower, dims + ROPE_HALF, tl.where(rotated, dims - ROPE_HALF, dims))
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        if QK_NORM != 0:  # the norms' weights at each feature and at its partner
            wq = tl.load(q_norm_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
            wq_partner = tl.load(q_norm_ptr + partner, mask=dim_mask, other=0.0).to(tl.float32)
            wk = tl.load(k_norm_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
            wk_partner = tl.load(k_norm_ptr + partner, mask=dim_mask, other=0.0).to(tl.float32)
    table = block_table_ptr + seq.to(tl.int64) * stride_bt
    pos = start + tl.arange(0, BLOCK_N)  # the first tile's absolute key positions
    valid = pos < end
    kv_off = kv_offsets(table, pos, valid, kv_head, stride_cb, stride_co, stride_ch, PAGE_SIZE)
    older = (valid & (pos < seq_len - 1))[:, None] & dim_mask[None, :]
    k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=older, other=0.0)
    v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=older, other=0.0)
    pdl.wait(USE_PDL)
    if MASK == 4:  # cross: q comes from the kernel just before (Mllama's q norm) and no key
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0, cache_modifier=".cg")  # is stored
    if split >= active:
        return
    newest = (pos == seq_len - 1)[:, None] & dim_mask[None, :]
    if ROPE_HALF == 0:  # the new key and value, stored by the previous kernel
        k_new = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=newest, other=0.0)
        v_new = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=newest, other=0.0)
        k = tl.where(newest, k_new, k)
        v = tl.where(newest, v_new, v)
    else:  # rotate q and the new key as they load; the first split stores the new key/value
        q_row = q_ptr + seq * stride_qs + heads[:, None] * stride_qh
        k_row = new_k_ptr + seq * stride_ks + kv_head * stride_kh
        if QK_NORM == 0:
            q = rotate(q_row, dims[None, :], partner[None, :], q_mask, cos[None, :],
                        sin[None, :], lower[None, :])  # fmt: skip
            k_new = rotate(k_row, dims, partner, dim_mask, cos, sin, lower)
        else:  # each head RMS-normalized first, as `qk_rms_norm_` does
            q = norm_rotate(q_row, dims[None, :], partner[None, :], q_mask, cos[None, :],
                            sin[None, :], lower[None, :], wq[None, :], wq_partner[None, :],
                            norm_eps, HEAD_DIM, QK_NORM == 2, 1)  # fmt: skip
            k_new = norm_rotate(k_row, dims, partner, dim_mask, cos, sin, lower, wk,
                                wk_partner, norm_eps, HEAD_DIM, QK_NORM == 2, 0)  # fmt: skip
        v_new = tl.load(new_v_ptr + seq * stride_vs + kv_head * stride_vh + dims, mask=dim_mask)
        if FP8_KV:  # as stored: scaled, saturated, E4M3 (attended as such)
            k_new = fp8_scaled(k_new, k_scale)
            v_new = fp8_scaled(v_new, v_scale)
        k_new = k_new.to(k_cache_ptr.dtype.element_ty)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        if (split == 0) & (slot >= 0):
            dst = (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_co
            dst += kv_head * stride_ch + dims
            tl.store(k_cache_ptr + dst, k_new, mask=dim_mask)
            tl.store(v_cache_ptr + dst, v_new, mask=dim_mask)
        k = tl.where(newest, k_new[None, :], k)
        v = tl.where(newest, v_new[None, :], v)
    if DOT_F32:  # the interpreter cannot tl.dot bf16 operands: do the dots in fp32
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if start < end:  # (an all-masked tile would give exp2(-inf + inf) = NaN)
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, cap_log2, SOFTCAP)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        kv_off = kv_offsets(table, pos, valid, kv_head, stride_cb, stride_co, stride_ch,
                             PAGE_SIZE)  # fmt: skip
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, cap_log2, SOFTCAP)

    out_mask = row_mask[:, None] & dim_mask[None, :]
    if FP8_KV:  # the FP8 values' scale (a constant factor of every split)
        acc = acc * v_scale
    if active == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # empty sequence -> zeros
        o_off = seq * stride_os + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials are indexed [seq, head, split]; an empty split stores lse = -inf, out = 0.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        head_base = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS  # [BLOCK_G]
        tl.store(part_lse_ptr + head_base + split, lse, mask=row_mask)
        tl.store(part_out_ptr + (head_base + split)[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=out_mask)  # fmt: skip
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        counter = counter_ptr + seq * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == active - 1:
            # The last split of this (sequence, kv head) merges all of them, in split order.
            merge_splits(part_out_ptr, part_lse_ptr, out_ptr, head_base, seq, heads, dims,
                          row_mask, out_mask, stride_os, stride_oh, active, HEAD_DIM,
                          BLOCK_G, BLOCK_D, BLOCK_S, MERGE_UNROLL)  # fmt: skip
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    spec: AttentionSpec,
    num_splits: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 3,
    min_split_keys: int = 1,
    new: NewTokens | None = None,
    kv_scales: tuple[float, float] | None = None,
    key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention of `q [num_seqs, heads, head_dim]` (one token per sequence), masked
    and soft-capped as `spec` says (not bidirectional: a decode step is causal by nature).

    `num_splits` is the most KV splits a sequence uses; in-kernel each uses only as many as
    give every split `min_split_keys` keys of its real context (1 = always all of them).
    Reads only shapes on the host (no syncs): safe to capture in a CUDA graph. Under PDL the
    kernel reads q and all but each sequence's newest key before waiting on the kernel launched
    just before it, so that one may write only the newest keys (the KV store, as the attention
    layer runs them); whatever wrote q must come earlier. Cross attention stores nothing in a
    decode step: its q (written by the kernel just before, a q norm) is read after the wait.

    `new` given: q is unrotated, and the kernel rotates q and `new.k`, stores `new.k`/`new.v`
    at `new.slot_mapping` and attends to them: the same as `rotary_embedding`, `store_kv` and
    this call without `new`; with `new.norms`, q and k are RMS-normalized per head first (as
    `qk_rms_norm_` before those three). Then q/k/v are read after the PDL wait (the kernel
    just before may write them: the qkv projection) and cos/sin/slots before it.

    An FP8 cache holds keys / `k_scale` and values / `v_scale` (`kv_scales`, as `store_kv`
    writes them): the key scale folds into the softmax scale, the value scale into the output.

    Cross attention (`spec.mask == CROSS`): `kv_cache`, `block_tables` and `seq_lens` are the
    cross group's (encoder rows) and `key_ranges` (int32 `[num_seqs]` lo, hi) the rows each
    query sees.
    """
    if spec.mask == Mask.BIDIRECTIONAL:
        raise ValueError("paged_decode: a bidirectional layer has no decode step")
    if (spec.mask == Mask.CROSS) != (key_ranges is not None):
        raise ValueError("paged_decode: cross attention takes key_ranges, other masks none")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, page_size, kv_heads, head_dim]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits > 1:
        part_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device
        )
        counters = arrival_counters(q.device, num_seqs * num_kv_heads)
    else:  # unused by the kernel; any fp32 tensor will do
        part_out = part_lse = counters = out.new_empty((1,), dtype=torch.float32)
    block_d = triton.next_power_of_2(head_dim)
    half = 0
    if new is not None:
        half = new.cos.shape[-1]
        if not (0 < 2 * half <= head_dim and new.cos.shape == new.sin.shape):
            raise ValueError(
                f"paged_decode: cos/sin {tuple(new.cos.shape)} for head_dim {head_dim}"
            )
        if new.k.stride(-1) != 1 or new.v.stride(-1) != 1 or new.cos.stride(-1) != 1:
            raise ValueError("paged_decode: new k/v and cos/sin need a unit last stride")
        if new.sin.stride() != new.cos.stride():
            raise ValueError("paged_decode: cos and sin need the same strides")
    else:  # unread by the kernel
        new = NewTokens(q, q, out, out, seq_lens)
    norms = new.norms
    flag = pdl.use_pdl(q)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        counters,
        new.k,
        new.v,
        new.cos,
        new.sin,
        new.slot_mapping,
        *(norms[:3] if norms is not None else (out, out, 0.0)),
        *(key_ranges if key_ranges is not None else (seq_lens, seq_lens)),
        spec.scale * _LOG2E * (1.0 if kv_scales is None else kv_scales[0]),
        (spec.softcap or 1.0) * _LOG2E,
        spec.window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        new.k.stride(0),
        new.k.stride(1),
        new.v.stride(0),
        new.v.stride(1),
        new.cos.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        MERGE_UNROLL=MERGE_UNROLL,
        MIN_SPLIT_KEYS=min_split_keys,
        MASK=int(spec.mask),
        SOFTCAP=spec.softcap is not None,
        DOT_F32=not q.is_cuda,
        ROPE_HALF=half,
        QK_NORM=0 if norms is None else 1 + norms.unit_offset,
        USE_PDL=flag,
        k_scale=1.0 if kv_scales is None else float(kv_scales[0]),
        v_scale=1.0 if kv_scales is None else float(kv_scales[1]),
        FP8_KV=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=flag,
    )
    return out
