"""Triton kernels of multi-head latent attention (`mla.py`): the absorbed-form decode over the
paged latent cache, and the latent store.

`mla_decode`: grid `(head blocks, splits, sequences)`. A program takes `BLOCK_H` query heads
of one sequence and one contiguous slice of its context (split-KV: batch-1 decode has one
sequence and few head blocks, so the context is what spreads over the SMs), and streams the
slice's cached `[c | k_pe]` rows in `BLOCK_N`-token tiles: scores `q_lat . c + q_pe . k_pe`,
online softmax, `acc += p @ c`. Every head shares the latent rows (MQA), so a tile read from
HBM serves `BLOCK_H` heads at once, and the head blocks of one (split, sequence) are adjacent in
the grid (axis 0): they run side by side and the tile's later reads hit L2, so the cache is
read from HBM about once per step. Each split writes its fp32 partial and log-sum-exp; a
second small kernel merges the splits. Sizes come from shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core.attention.triton_backend import _num_sms

_LOG2E = 1.4426950408889634
MIN_KEYS_PER_SPLIT = 64
MAX_SPLITS = 16


@triton.jit(do_not_specialize=["stride_bt"])
def _mla_decode_kernel(
    q_ptr,  # [B, H, RANK + ROPE]: [q_lat | q_pe]
    cache_ptr,  # [num_blocks, PAGE_SIZE, 1, RANK + ROPE]
    block_table_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    part_out_ptr,  # fp32 [B, H, NUM_SPLITS, RANK]
    part_lse_ptr,  # fp32 [B, H, NUM_SPLITS], log2 domain
    qk_scale,  # softmax scale * log2(e)
    num_heads,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_co,
    stride_bt,
    RANK: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_PE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    head_block, split, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    rd, pd = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_PE)
    r_ok, p_ok = rd < RANK, pd < ROPE
    q_rows = q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_rows + rd[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    q_pe = tl.load(q_rows + RANK + pd[None, :], mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    if DOT_F32:  # the interpreter cannot tl.dot half operands
        q_lat, q_pe = q_lat.to(tl.float32), q_pe.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(seq_len, lo + per_split)
    table = block_table_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < hi
        block = tl.load(table + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        rows = cache_ptr + block * stride_cb + (pos % PAGE_SIZE) * stride_co  # [BLOCK_N]
        lat = tl.load(rows[:, None] + rd[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0)
        pe = tl.load(rows[:, None] + RANK + pd[None, :], mask=ok[:, None] & p_ok[None, :],
                     other=0.0)  # fmt: skip
        if DOT_F32:
            lat, pe = lat.to(tl.float32), pe.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(lat.to(q_lat.dtype)), input_precision="ieee")
        s += tl.dot(q_pe, tl.trans(pe.to(q_pe.dtype)), input_precision="ieee")
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision="ieee")
        m_i = m_new
    empty = l_i == 0.0  # a split past the end of a short context
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
    tl.store(part_out_ptr + part[:, None] * RANK + rd[None, :], out,
             mask=h_ok[:, None] & r_ok[None, :])  # fmt: skip
    tl.store(part_lse_ptr + part, lse, mask=h_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,  # fp32 [B * H, NUM_SPLITS, RANK]
    part_lse_ptr,  # fp32 [B * H, NUM_SPLITS]
    out_ptr,  # [B * H, RANK]
    RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    splits, rd = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_R)
    s_ok, r_ok = splits < NUM_SPLITS, rd < RANK
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + splits, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # empty splits: 0
    part = tl.load(part_out_ptr + (row * NUM_SPLITS + splits)[:, None] * RANK + rd[None, :],
                   mask=s_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * RANK + rd, out.to(out_ptr.dtype.element_ty), mask=r_ok)


def mla_num_splits(num_seqs: int, head_blocks: int, max_context: int, num_sms: int) -> int:
    """Splits per sequence, from host ints fixed per CUDA-graph bucket: about two waves of
    programs, each split covering at least `MIN_KEYS_PER_SPLIT` keys of the longest context."""
    want = triton.cdiv(2 * num_sms, max(1, num_seqs * head_blocks))
    return max(1, min(want, triton.cdiv(max_context, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    rank: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: q `[B, H, rank + rope]` over `cache [blocks, page, 1, rank + rope]`
    -> `[B, H, rank]` (the softmax-weighted latents, in q's dtype)."""
    num_seqs, num_heads, dim = q.shape
    page = cache.shape[1]
    assert cache.shape[-1] == dim and cache.stride(-1) == 1 and q.stride(-1) == 1
    block_h = 16
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        max_context = block_tables.shape[1] * page
        num_splits = mla_num_splits(num_seqs, head_blocks, max_context, _num_sms(q.device))
    part_out = torch.empty(num_seqs, num_heads, num_splits, rank, dtype=torch.float32,
                           device=q.device)  # fmt: skip
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_r = triton.next_power_of_2(rank)
    extra = {"num_warps": 4, "num_stages": 2} if q.is_cuda else {}
    grid = (head_blocks, num_splits, num_seqs)
    _mla_decode_kernel[grid](
        q, cache, block_tables, seq_lens, part_out, part_lse, scale * _LOG2E, num_heads,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        RANK=rank, ROPE=dim - rank, BLOCK_R=block_r,
        BLOCK_PE=max(16, triton.next_power_of_2(dim - rank)), BLOCK_H=block_h,
        BLOCK_N=32 if q.is_cuda else 16, PAGE_SIZE=page, NUM_SPLITS=num_splits,
        DOT_F32=not q.is_cuda, **extra,
    )  # fmt: skip
    out = torch.empty(num_seqs, num_heads, rank, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(num_seqs * num_heads,)](
        part_out, part_lse, out, RANK=rank, BLOCK_R=block_r, NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
    )  # fmt: skip
    return out


@triton.jit
def _store_latent_kernel(src_ptr, cache_ptr, slot_ptr, dim, stride_src, stride_cb, stride_co,
                         PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding: nothing stored
        return
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    row = tl.load(src_ptr + token.to(tl.int64) * stride_src + cols, mask=ok)
    dst = cache_ptr + (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_co
    tl.store(dst + cols, row.to(cache_ptr.dtype.element_ty), mask=ok)


def store_latent(entries: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write `entries [T, rank + rope]` to `cache [blocks, page, 1, rank + rope]` at
    `slot_mapping` (-1: skipped). One launch, no host sync."""
    if entries.shape[0] == 0:
        return
    entries = entries if entries.stride(-1) == 1 else entries.contiguous()
    dim = entries.shape[1]
    _store_latent_kernel[(entries.shape[0],)](
        entries, cache, slot_mapping, dim, entries.stride(0), cache.stride(0), cache.stride(1),
        PAGE_SIZE=cache.shape[1], BLOCK=triton.next_power_of_2(dim),
    )  # fmt: skip
