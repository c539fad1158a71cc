"""Split-KV paged prefill: the host's split count, the query packing, the active-split rule,
the partials' buffers and their merge (`triton_prefill._attn_fwd_kernel` takes `SPLITS`).

Split-KV (`SPLITS` > 1, paged launches, causal without window, chunk or media ranges, or
cross): a launch of few queries over a long cache (a repeated video's 16-token text tail after
38k cached tokens: 28 programs on 132 SMs, each streaming every key; a speculative verify step;
an Mllama prompt's cross layers over its image's 6404 encoder rows, 32 programs before)
cuts each program's key range into up to `SPLITS` runs of whole tiles, a grid axis of their
own (`split_count` on the host), and packs a kv head's query heads into one program's rows
(`packed_rows`: each key tile read once a kv head, not once a query head). How many splits
have work is decided on the device from the sequence's length (at least `MIN_TILES` tiles
each), so one launch captured in a prefill graph serves every cache length: with several,
each writes its normalized partial and log2-sum-exp (fp32) and counts its arrival on its
tile's counter (`llm_core/counters.py`); the last to arrive merges them (`merge_split_rows`), so
the attention stays one launch. With one, that program writes the output itself. What a short
context still pays once the host has picked splits (a prefill graph always does for buckets
<= 64: its table is the whole context wide): `SPLITS` - 1 idle programs per tile, which exit
after two int loads; `scripts/bench_prefill_splits.py`'s last row measures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core.attention.prefill_tiles import prefill_config
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv import num_sms

# Split-KV prefill (`split_count`): launches of at most this many queries, cut into at most
# SPLIT_MAX key ranges of at least SPLIT_MIN_TILES tiles each.
SPLIT_MAX_QUERIES = 64
SPLIT_MAX = 16
SPLIT_MIN_TILES = 8
# Interpreted (CPU tests, 16-key tiles): 1 so tiny contexts split many ways; a test sets 2 to
# check the device-side count of active splits that SPLIT_MIN_TILES drives on CUDA.
SPLIT_MIN_TILES_INTERPRETED = 1
# Partials the merging split loads at once (`merge_split_rows`)
MERGE_UNROLL = tl.constexpr(4)


def packed_rows(block_m: int, group: int) -> int:
    """Queries a split launch's program holds: with GQA (`group` query heads a kv head, at most
    `block_m`) the group's heads packed into the tile's rows, `block_m // group` queries x
    `group` heads, so each key tile is read once a kv head, not once a query head; else one
    head's `block_m` queries."""
    return block_m // group if 1 < group <= block_m else block_m


def split_count(max_q: int, num_heads: int, max_seq_len: int, device: torch.device,
                group: int = 1) -> int:  # fmt: skip
    """Key-range splits of a causal paged prefill launch (1: the one-pass kernel): a launch of
    few query tiles (a short chunk after a long cached prefix: a repeated image's or video's
    text tail, a chat turn, a speculative verify step) gets about two programs an SM, its
    tiles packed by kv head (`packed_rows`; `group` query heads a kv head); a context too
    short to give each split `SPLIT_MIN_TILES` key tiles keeps one pass (no partials, no merge
    launch). Inside a prefill graph `max_seq_len` is the table's whole width: the kernel then
    decides on the device how many splits have work (one: no partials, the merge exits)."""
    if max_q > SPLIT_MAX_QUERIES or device.type != "cuda":  # (interpreted: tests ask for it)
        return 1
    block_m, block_n, _, _ = prefill_config(128, True, max_q)
    if max_seq_len < 2 * SPLIT_MIN_TILES * block_n:
        return 1
    rows = packed_rows(block_m, group)
    programs = triton.cdiv(max_q, rows) * (num_heads // group if rows < block_m else num_heads)
    return max(1, min(SPLIT_MAX, 2 * num_sms(device) // programs))


def split_buffers(q: torch.Tensor, splits: int, tiles: int) -> dict:
    """The attention kernel's split arguments for `splits` > 1 programs a key range of each of
    `tiles` (seq, q block, head) tiles: the partials (fp32 `[splits, tokens, heads,
    head_dim]`), their log2-sum-exps, a zeroed arrival counter a tile (the last split to
    finish merges: `merge_split_rows`), the active-split rule's least tiles (`SPLIT_MIN_TILES`;
    interpreted `SPLIT_MIN_TILES_INTERPRETED`)."""
    tokens, num_heads, head_dim = q.shape
    return {
        "num_tokens": tokens,
        "part_out_ptr": q.new_empty((splits, tokens, num_heads, head_dim), dtype=torch.float32),
        "part_lse_ptr": q.new_empty((splits, tokens, num_heads), dtype=torch.float32),
        "counter_ptr": arrival_counters(q.device, tiles),
        "SPLITS": splits,
        "MIN_TILES": SPLIT_MIN_TILES if q.is_cuda else SPLIT_MIN_TILES_INTERPRETED,
    }


@triton.jit
def active_splits(kv_len, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_TILES: tl.constexpr):
    """Splits with work for a sequence's causal launch: its keys [0, kv_len) in runs of >=
    MIN_TILES tiles, at most SPLITS. The attention kernel and the merge must agree on it, so it
    depends on the sequence only, not on a program's query rows (a tile of early queries, whose
    keys end before kv_len, may leave its last splits empty: their partials weigh nothing)."""
    return tl.minimum(SPLITS, tl.maximum(tl.cdiv(tl.cdiv(kv_len, BLOCK_N), MIN_TILES), 1))


@triton.jit
def merge_split_rows(part_out_ptr, part_lse_ptr, part_row, split_rows, row_mask, cols, out_lo,
                    active, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_LO: tl.constexpr):  # fmt: skip
    """A split tile's output rows from its `active` partials (the last split to finish runs
    it): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max), split by split in order, the
    head's two column parts as the kernel holds them (`cols`; `out_lo` passes through when
    D_LO is 0). `part_row`: split 0's row of each tile row; `split_rows`: a split's rows. The
    loads bypass L1 (`.cg`: other programs wrote them), MERGE_UNROLL splits at a time."""
    dims, dim_mask, dims_lo, dim_mask_lo = cols
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_lo = out_lo
    if D_LO > 0:
        acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
    for s0 in range(0, active, MERGE_UNROLL):
        for u in tl.static_range(MERGE_UNROLL):  # independent loads in flight, not one a split
            split = s0 + u
            row = part_row + split * split_rows
            rows = row_mask & (split < active)
            lse = tl.load(part_lse_ptr + row, mask=rows, other=float("-inf"), cache_modifier=".cg")
            p_off = row[:, None] * HEAD_DIM
            o = tl.load(part_out_ptr + p_off + dims[None, :], mask=rows[:, None] & dim_mask,
                        other=0.0, cache_modifier=".cg")  # fmt: skip
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            total = total * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o
            if D_LO > 0:
                o_lo = tl.load(part_out_ptr + p_off + dims_lo[None, :],
                               mask=rows[:, None] & dim_mask_lo[None, :], other=0.0,
                               cache_modifier=".cg")  # fmt: skip
                acc_lo = acc_lo * alpha[:, None] + w[:, None] * o_lo
            m = m_new
    inv = 1.0 / tl.where(total == 0.0, 1.0, total)
    if D_LO > 0:
        acc_lo = acc_lo * inv[:, None]
    return acc * inv[:, None], acc_lo
