"""Flash-attention style Triton kernel shared by paged prefill and encoder varlen attention.

Grid `(num_seqs, cdiv(max_query_len, BLOCK_M), num_heads)`: a program owns `BLOCK_M` queries of
one head of one sequence and streams that sequence's keys in `BLOCK_N` tiles with an online
softmax (fp32 running max / sum / accumulator, exp2 with the scale folded in).

- `PAGED=True` (decoder prefill, chunked prefill, prefix-cache hits): keys come from the paged
  cache through the block table; the sequence's new queries are its last `query_len` positions,
  so query `i` sits at `seq_len - query_len + i` and sees the keys its mask allows.
- `PAGED=False` (encoders): q/k/v are flat `[total_tokens, heads, head_dim]` `cu_seqlens` segments.

The mask is a constexpr `MASK` (`spec.Mask`: 0 causal, 1 sliding window, 2 chunked local,
3 bidirectional, 4 cross), so each kind compiles its own variant and causal runs no window code.
`SOFTCAP` caps the logits (`softcap * tanh(x / softcap)`) before the softmax. `RANGES` (paged
steps with media attended bidirectionally, `meta.media_key_ranges`) lets each query also see
the keys of its own range `[lo, hi)` (still inside its window); other steps compile without it.
Cross attention (MASK 4, always with RANGES) reads the sequence's encoder rows instead of its
tokens (`seq_lens`: rows, the table: a cross group's) and each query sees exactly the rows of
its range (`meta.cross_ranges`); a query whose range is empty gets zeros.
A head dim that is not a power of 2 runs as two power-of-2 parts (`head_dim_split`, `D_LO`):
S = q_hi k_hi^T + q_lo k_lo^T and two accumulators, so 80 costs 64 + 16 columns, not 128.
Tile sizes and one key tile's step: `prefill_tiles.py`. A causal or cross launch of few queries
over many keys splits its key range over several programs (`SPLITS`): `prefill_splits.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.attention.prefill_splits import (
    active_splits,
    merge_split_rows,
    packed_rows,
    split_buffers,
    split_count,
)
from polymodal.llm_core.attention.prefill_tiles import head_dim_split, key_tile, prefill_config
from polymodal.llm_core.attention.spec import PREFILL_METADATA as METADATA
from polymodal.llm_core.attention.spec import AttentionSpec, Mask

_LOG2E = 1.4426950408889634


# The block-table stride (a step's widest table) changes from step to step: not specialized on,
# so a new width never compiles a new variant in the middle of a run.
@triton.jit(do_not_specialize=["stride_bt", "num_tokens"], do_not_specialize_on_alignment=METADATA)
def _attn_fwd_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # PAGED: [num_blocks, page_size, kv_heads, head_dim]; else [num_tokens, kv_heads, d]
    v_ptr,
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_start_ptr,  # int32 [num_seqs + 1] query offsets (cu_seqlens when not PAGED)
    seq_lens_ptr,  # int32 [num_seqs] context lengths (PAGED only)
    block_table_ptr,  # int32 [num_seqs, max_blocks] (PAGED only)
    range_lo_ptr,  # int32 [num_tokens] media key ranges / cross rows (RANGES only)
    range_hi_ptr,
    qk_scale,  # softmax scale * log2(e)
    cap_log2,  # soft-cap * log2(e) (SOFTCAP)
    window,  # sliding window (MASK 1) or chunk size (MASK 2)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kt,  # PAGED: stride of a cache block; else of a token
    stride_ko,  # PAGED: stride of an offset in a block; unused otherwise
    stride_kh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # the head's first part: all of it padded, or D_HI when split
    PAGED: tl.constexpr,
    MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
    RANGES: tl.constexpr,
    v_scale=1.0,  # an FP8 cache's value scale (its key scale is folded into qk_scale)
    FP8_KV: tl.constexpr = False,
    D_LO: tl.constexpr = 0,  # the second part's width (head_dim_split); 0: no second part
    num_tokens=0,  # SPLITS > 1: the rows of q (the parts' second dim)
    part_out_ptr=None,  # SPLITS > 1: fp32 [SPLITS, num_tokens, num_heads, HEAD_DIM]
    part_lse_ptr=None,  # SPLITS > 1: fp32 [SPLITS, num_tokens, num_heads] (log2 units)
    counter_ptr=None,  # SPLITS > 1: int32 per (seq, q block, axis-2 head), zero between launches
    SPLITS: tl.constexpr = 1,  # programs a (seq, q block, head)'s key range is cut over
    MIN_TILES: tl.constexpr = 1,  # key tiles a split takes at least (fewer splits are active)
    PACK: tl.constexpr = False,  # SPLITS > 1: a program holds a kv head's GROUP query heads
    Q_ROWS: tl.constexpr = 0,  # PACK: queries a program holds (BLOCK_M // GROUP)
):
    pdl.wait(USE_PDL)
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    head = tl.program_id(2)
    split = 0
    if SPLITS > 1:
        split = head % SPLITS
        head = head // SPLITS
    kv_head = head // GROUP
    TOKENS: tl.constexpr = Q_ROWS if PACK else BLOCK_M  # queries a program holds
    if PACK:  # grid axis 2 counts kv heads: rows are (query, head of the group) pairs
        kv_head = head
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_start
    if q_block * TOKENS >= q_len:  # this sequence has fewer queries than the grid
        return
    if PAGED:
        kv_len = tl.load(seq_lens_ptr + seq)
    else:
        kv_len = q_len
    ctx_len = kv_len - q_len  # cached prefix before the new queries
    active = 1
    if SPLITS > 1:  # idle splits (a short context in a wide graph) leave before any q load
        active = active_splits(kv_len, BLOCK_N, SPLITS, MIN_TILES)
        if split >= active:
            return

    if PACK:  # row r: query r // GROUP of the tile, head r % GROUP of the kv head's group
        r = tl.arange(0, BLOCK_M)
        rows = q_block * TOKENS + r // GROUP  # [BLOCK_M] query index in the sequence
        heads = kv_head * GROUP + r % GROUP
        row_mask = (r < TOKENS * GROUP) & (rows < q_len)
    else:
        rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        heads = head
        row_mask = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_pos = ctx_len + rows  # absolute positions
    head_off = heads * stride_qh
    if PACK:
        head_off = head_off[:, None]
    q_row = (q_start + rows)[:, None].to(tl.int64) * stride_qt + head_off
    q_off = q_row + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    dims_lo, dim_mask_lo, q_lo = dims, dim_mask, q  # placeholders when D_LO is 0 (never read)
    if D_LO > 0:  # the head's columns [BLOCK_D, HEAD_DIM) (padded to D_LO)
        dims_lo = BLOCK_D + tl.arange(0, D_LO)
        dim_mask_lo = dims_lo < HEAD_DIM
        q_lo_mask = row_mask[:, None] & dim_mask_lo[None, :]
        q_lo = tl.load(q_ptr + q_row + dims_lo[None, :], mask=q_lo_mask, other=0.0)
    if DOT_F32:  # the interpreter cannot tl.dot bf16 operands: do the dots in fp32
        q = q.to(tl.float32)
        q_lo = q_lo.to(tl.float32)

    # Key range this query tile can see.
    hi = kv_len
    if MASK < 3:  # causal
        hi = tl.minimum(kv_len, ctx_len + (q_block + 1) * TOKENS)
    lo = 0
    if MASK == 1:  # the window of the tile's first query
        lo = tl.maximum(ctx_len + q_block * BLOCK_M - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if MASK == 2:  # the chunk of the tile's first query
        lo = ((ctx_len + q_block * BLOCK_M) // window) * window
        lo = (lo // BLOCK_N) * BLOCK_N

    # Tiles in [lo, full_end) are visible to every query of this tile: no masks there.
    full_end = (hi // BLOCK_N) * BLOCK_N
    if MASK < 3:
        full_end = (tl.minimum(hi, ctx_len + q_block * TOKENS + 1) // BLOCK_N) * BLOCK_N
    if MASK == 1:  # windowed kinds mask every tile
        full_end = lo
    if MASK == 2:
        full_end = lo
    r_lo = rows  # placeholders when RANGES is off (never read)
    r_hi = rows
    if RANGES:  # media ranges reach past the causal edge: mask every tile up to their end
        r_lo = tl.load(range_lo_ptr + q_start + rows, mask=row_mask, other=0)
        r_hi = tl.load(range_hi_ptr + q_start + rows, mask=row_mask, other=0)
        if MASK == 4:  # cross: from the first row any query of the tile sees to the last
            lo = tl.min(tl.where(r_hi > r_lo, r_lo, kv_len), 0)
            lo = (lo // BLOCK_N) * BLOCK_N
            hi = tl.minimum(tl.max(r_hi, 0), kv_len)
        else:
            hi = tl.maximum(hi, tl.minimum(tl.max(r_hi, 0), kv_len))
        full_end = lo
    table = block_table_ptr + seq.to(tl.int64) * stride_bt
    kv_base = (q_start, table, kv_head * stride_kh, stride_kt, stride_ko)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_lo = acc  # D_LO 0: carried through the loops unchanged (folded away)
    if D_LO > 0:
        acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
    cols = (dims, dim_mask, dims_lo, dim_mask_lo)
    if SPLITS > 1:  # this program's share of [lo, hi): whole tiles from lo (causal: lo = 0)
        per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), active)
        lo = lo + split * per * BLOCK_N
        end = tl.minimum(hi, lo + per * BLOCK_N)
        full_end = tl.minimum(full_end, end)
    else:
        end = hi
    for n0 in range(lo, full_end, BLOCK_N):
        acc, acc_lo, l_i, m_i = key_tile(acc, acc_lo, l_i, m_i, q, q_lo, q_pos, k_ptr, v_ptr,
                                         kv_base, n0, hi, window, qk_scale, cap_log2, cols,
                                         r_lo, r_hi, PAGE_SIZE, BLOCK_N, PAGED, MASK, SOFTCAP,
                                         False, RANGES, D_LO)  # fmt: skip
    for n0 in range(tl.maximum(full_end, lo), end, BLOCK_N):
        acc, acc_lo, l_i, m_i = key_tile(acc, acc_lo, l_i, m_i, q, q_lo, q_pos, k_ptr, v_ptr,
                                         kv_base, n0, hi, window, qk_scale, cap_log2, cols,
                                         r_lo, r_hi, PAGE_SIZE, BLOCK_N, PAGED, MASK, SOFTCAP,
                                         True, RANGES, D_LO)  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    norm = l_safe[:, None]
    out = acc / norm
    out_lo = acc_lo
    if D_LO > 0:
        out_lo = acc_lo / norm
    if FP8_KV:
        out = out * v_scale
        out_lo = out_lo * v_scale
    final = row_mask  # rows this program writes to `out` (all of them unless split)
    if SPLITS > 1:  # several active splits: a partial (normalized) and its log2-sum-exp
        partial = row_mask & (active > 1)
        final = row_mask & (active == 1)
        num_heads = tl.num_programs(2) // SPLITS  # parts are [SPLITS, num_tokens, heads(, d)]
        if PACK:
            num_heads = num_heads * GROUP
        part_row = (split * num_tokens + q_start + rows).to(tl.int64) * num_heads + heads
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + part_row, lse, mask=partial)
        p_off = part_row[:, None] * HEAD_DIM
        tl.store(part_out_ptr + p_off + dims[None, :], out, mask=partial[:, None] & dim_mask)
        if D_LO > 0:
            lo_mask = partial[:, None] & dim_mask_lo[None, :]
            tl.store(part_out_ptr + p_off + dims_lo[None, :], out_lo, mask=lo_mask)
        if active > 1:
            tl.debug_barrier()  # every thread's partial is written before the counter moves
            tile = (seq * tl.num_programs(1) + q_block) * (tl.num_programs(2) // SPLITS) + head
            if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu") == active - 1:
                # the last split of this tile to finish merges all of them, in split order
                base = part_row - split * num_tokens * num_heads
                out, out_lo = merge_split_rows(part_out_ptr, part_lse_ptr, base,
                                             num_tokens * num_heads, row_mask, cols, out_lo,
                                             active, HEAD_DIM, BLOCK_M, BLOCK_D, D_LO)  # fmt: skip
                final = row_mask
                tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")
    o_head = heads * stride_oh
    if PACK:
        o_head = o_head[:, None]
    o_row = (q_start + rows)[:, None].to(tl.int64) * stride_ot + o_head
    o_off = o_row + dims[None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_off, out.to(out_ty), mask=final[:, None] & dim_mask)
    if D_LO > 0:
        lo_mask = final[:, None] & dim_mask_lo[None, :]
        tl.store(out_ptr + o_row + dims_lo[None, :], out_lo.to(out_ty), mask=lo_mask)


def _launch(q, k, v, out, q_start, seq_lens, block_table, max_q, scale, mask, window, softcap,
            paged, kv_scales=None, ranges=None, splits=1):  # fmt: skip
    """Shared launch: block sizes by device, strides by mode; `mask` a `spec.Mask` code;
    `kv_scales` (k, v) of an FP8 cache: the key's folds into the softmax scale; `ranges`
    (lo, hi) per query: keys it sees besides its mask's; `splits` > 1 (paged: causal without
    ranges, or cross): the key range cut over that many programs, merged by the last one."""
    v_scale, fp8 = 1.0, k.dtype == torch.float8_e4m3fn
    if fp8 and kv_scales is not None:
        scale, v_scale = scale * kv_scales[0], float(kv_scales[1])
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = q_start.shape[0] - 1
    block_m, block_n, num_warps, num_stages = prefill_config(head_dim, q.is_cuda, max_q)
    block_d, d_lo = head_dim_split(head_dim)
    flag = pdl.use_pdl(q)
    extra = {"num_warps": num_warps, "num_stages": num_stages} if q.is_cuda else {}
    if paged:  # k, v: [num_blocks, page_size, kv_heads, head_dim]
        kv_heads, page_size = k.shape[2], k.shape[1]
        strides = (k.stride(0), k.stride(1), k.stride(2), block_table.stride(0))
    else:  # k, v: [num_tokens, kv_heads, head_dim]
        kv_heads, page_size = k.shape[1], 1
        strides = (k.stride(0), 0, k.stride(1), 0)
    assert k.stride() == v.stride(), "k and v need the same layout"
    group = num_heads // kv_heads
    rows = packed_rows(block_m, group) if splits > 1 else block_m
    pack = rows < block_m  # split launches hold a kv head's query group a program
    grid = (num_seqs, triton.cdiv(max_q, rows), (kv_heads if pack else num_heads) * splits)
    parts = {}
    if splits > 1:
        causal = int(mask) == int(Mask.CAUSAL) and ranges is None
        assert paged and (causal or int(mask) == int(Mask.CROSS)), "split: causal or cross only"
        tiles = num_seqs * grid[1] * grid[2] // splits
        parts = {**split_buffers(q, splits, tiles), "PACK": pack, "Q_ROWS": rows}
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        q_start,
        seq_lens,
        block_table,
        *(ranges if ranges is not None else (q_start, q_start)),
        scale * _LOG2E,
        (softcap or 1.0) * _LOG2E,
        window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *strides,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PAGED=paged,
        MASK=int(mask),
        SOFTCAP=softcap is not None,
        DOT_F32=not q.is_cuda,
        USE_PDL=flag,
        RANGES=ranges is not None,
        v_scale=v_scale,
        FP8_KV=fp8,
        D_LO=d_lo,
        launch_pdl=flag,
        **parts,
        **extra,
    )
    return out


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    spec: AttentionSpec,
    kv_scales: tuple[float, float] | None = None,
    key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seq_len: int = 0,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of flat `q [num_tokens, heads, head_dim]` over the paged cache, masked and
    soft-capped as `spec` says; `key_ranges` (int32 `[num_tokens]` lo, hi) add keys each
    query sees (`AttentionMetadata.media_key_ranges`). `out` (`[num_tokens, heads, head_dim]`,
    head_dim contiguous) receives the rows of the sequences of `query_start_loc` (which may
    start past row 0: a mixed step's tail, `AttentionMetadata.decode_split`); other rows are
    left as they are.

    `max_query_len` (a host int) sizes the grid; queries past a sequence's length exit early.
    An FP8 cache holds keys / `k_scale` and values / `v_scale` (`kv_scales`). A causal or
    cross launch of few queries over many keys (`max_seq_len`, host int: for cross the most
    encoder rows) splits its key ranges (`split_count`; `splits` overrides it: tests).
    """
    q = _unit_last(q)
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0:
        return out
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, page_size, kv_heads, head_dim]
    cross = spec.mask == Mask.CROSS  # its ranges are the rows it reads: splittable
    if not cross and (spec.mask != Mask.CAUSAL or key_ranges is not None):
        splits = 1
    elif splits is None:
        group = q.shape[1] // k_cache.shape[2]
        splits = split_count(max_query_len, q.shape[1], max_seq_len, q.device, group)
    return _launch(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        max_query_len, spec.scale, spec.mask, spec.window, spec.softcap, True, kv_scales,
        key_ranges, splits,
    )  # fmt: skip


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool = False,
) -> torch.Tensor:
    """Attention inside each segment `cu_seqlens[i]:cu_seqlens[i+1]` of flat `q, k, v`.

    q: `[total, heads, head_dim]`, k/v: `[total, kv_heads, head_dim]`; any head_dim (split into
    two power-of-2 parts or padded with masks, `head_dim_split`: the Qwen2.5-VL tower's 80 runs
    as 64 + 16).
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    cu_seqlens = cu_seqlens.to(torch.int32)
    return _launch(
        q, k, v, out, cu_seqlens, cu_seqlens, cu_seqlens,
        max_seqlen, scale, Mask.CAUSAL if causal else Mask.BIDIRECTIONAL, None, None, False,
    )  # fmt: skip
