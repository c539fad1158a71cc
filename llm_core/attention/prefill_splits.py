"""Split-KV paged prefill: the host's split count, the active-split rule both kernels share,
the partials' buffers and the merge kernel (`triton_prefill._attn_fwd_kernel` takes `SPLITS`).

Split-KV (`SPLITS` > 1, causal paged launches only: no window, chunk, ranges or cross): a
launch of few query tiles over a long cache (a repeated video's 16-token text tail after 38k
cached tokens: 28 programs on 132 SMs, each streaming every key) cuts each program's key range
into up to `SPLITS` runs of whole tiles, a grid axis of their own (`split_count` on the host).
How many have work is decided on the device (at least `MIN_TILES` tiles each), so one launch
captured in a prefill graph serves every cache length: with several, each writes its
normalized partial and log2-sum-exp (fp32) and `merge_splits_kernel` combines them; with one,
that program writes the output itself and the merge's programs exit. What a short context
still pays once the host has picked splits (a prefill graph always does for buckets <= 64: its
table is the whole context wide): `SPLITS` - 1 idle programs per (seq, q block, head) and the
merge launch, all of whose programs exit after three int loads (no partials written or read);
`scripts/bench_prefill_splits.py`'s last row measures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.attention.prefill_tiles import prefill_config
from polymodal.llm_core.layers.gemv import num_sms

# Split-KV prefill (`split_count`): launches of at most this many queries, cut into at most
# SPLIT_MAX key ranges of at least SPLIT_MIN_TILES tiles each.
SPLIT_MAX_QUERIES = 64
SPLIT_MAX = 16
SPLIT_MIN_TILES = 8
# Interpreted (CPU tests, 16-key tiles): 1 so tiny contexts split many ways; a test sets 2 to
# check the device-side count of active splits that SPLIT_MIN_TILES drives on CUDA.
SPLIT_MIN_TILES_INTERPRETED = 1


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


def split_buffers(q: torch.Tensor, splits: int) -> dict:
    """The attention kernel's split arguments for `splits` > 1 programs a key range: the
    partials (fp32 `[splits, tokens, heads, head_dim]`), their log2-sum-exps, the active-split
    rule's least tiles (`SPLIT_MIN_TILES`; interpreted `SPLIT_MIN_TILES_INTERPRETED`)."""
    tokens, num_heads, head_dim = q.shape
    return {
        "num_tokens": tokens,
        "part_out_ptr": q.new_empty((splits, tokens, num_heads, head_dim), dtype=torch.float32),
        "part_lse_ptr": q.new_empty((splits, tokens, num_heads), dtype=torch.float32),
        "SPLITS": splits,
        "MIN_TILES": SPLIT_MIN_TILES if q.is_cuda else SPLIT_MIN_TILES_INTERPRETED,
    }


def merge_splits(out, parts: dict, q_start, seq_lens, max_q: int, block_m: int, block_n: int,
                 use_pdl: bool) -> None:  # fmt: skip
    """The split launch's second half: `out` from the partials of `split_buffers`' `parts`."""
    num_seqs, num_heads, head_dim = q_start.shape[0] - 1, out.shape[1], out.shape[2]
    merge_splits_kernel[(num_seqs, triton.cdiv(max_q, block_m), num_heads)](
        out, parts["part_out_ptr"], parts["part_lse_ptr"], q_start, seq_lens,
        parts["num_tokens"], out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), SPLITS=parts["SPLITS"],
        MIN_TILES=parts["MIN_TILES"], USE_PDL=use_pdl, launch_pdl=use_pdl,
    )  # fmt: skip


@triton.jit
def active_splits(kv_len, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_TILES: tl.constexpr):
    """Splits with work for a sequence's causal launch: its keys [0, kv_len) in runs of >=
    MIN_TILES tiles, at most SPLITS. The attention kernel and the merge must agree on it, so it
    depends on the sequence only, not on a program's query rows (a tile of early queries, whose
    keys end before kv_len, may leave its last splits empty: their partials weigh nothing)."""
    return tl.minimum(SPLITS, tl.maximum(tl.cdiv(tl.cdiv(kv_len, BLOCK_N), MIN_TILES), 1))


@triton.jit(do_not_specialize=["num_tokens"])
def merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_out_ptr,  # fp32 [SPLITS, num_tokens, num_heads, HEAD_DIM]
    part_lse_ptr,  # fp32 [SPLITS, num_tokens, num_heads], log2 units
    q_start_ptr,
    seq_lens_ptr,
    num_tokens,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    MIN_TILES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The split-KV prefill's second half, one program a (seq, q block, head) as the first's
    grid: the same count of active splits from the causal key range (one: the first half wrote
    the output itself, nothing to do), then out = sum_s 2^(lse_s - max) o_s / sum_s 2^(...)."""
    pdl.wait(USE_PDL)
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    head = tl.program_id(2)
    num_heads = tl.num_programs(2)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_start
    if q_block * BLOCK_M >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    active = active_splits(kv_len, BLOCK_N, SPLITS, MIN_TILES)
    if active > 1:
        rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        dims = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for split in range(0, active):
            part_row = (split * num_tokens + q_start + rows).to(tl.int64) * num_heads + head
            lse = tl.load(part_lse_ptr + part_row, mask=row_mask, other=float("-inf"))
            o = tl.load(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], mask=mask,
                        other=0.0)  # fmt: skip
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            total = total * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o
            m = m_new
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        o_off = (q_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_off + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
