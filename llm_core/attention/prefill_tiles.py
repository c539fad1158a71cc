"""The flash-style prefill kernel's tiles (`triton_prefill.py`): their sizes by head dim and
query run (`prefill_config`, `LONG_QUERIES`), a head dim's two power-of-2 parts
(`head_dim_split`), and one key tile's online-softmax step (`key_tile`) with the logit
soft-cap (`softcap_log2`, also the decode kernel's)."""

from __future__ import annotations

import triton
import triton.language as tl

# Query rows from which a launch takes 128-row tiles on 8 warps (64 < head_dim <= 128; 256-wide
# heads would not fit the shared memory of 3 stages). H200, bf16
# (`.gpu/attn_bench.py`, eleventh session): Qwen2.5-VL tower full attention over 42k patches
# (d 80) 35.5 -> 30.1 ms, 64 frames' per-frame segments of 4784 17.5 -> 14.7, a 38k-token
# causal decoder prefill (d 128, GQA 7) 26.1 -> 22.7; its 64-patch windows stay faster on
# 64-row tiles (0.23 vs 0.41 ms).
LONG_QUERIES = 1024


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, D_LO): a head dim that is not a power of 2 runs as two power-of-2 parts, the
    largest power of 2 <= head_dim and the rest padded to a power of 2 >= 16 (tl.dot's least),
    when together they are narrower than the padded head: 80 = 64 + 16 (128 padded: 37.5% of
    both products on zero columns), 96 = 64 + 32, 72 = 64 + 16 (8 masked), 192 = 128 + 64.
    Else one part, padded to a power of 2: (next_power_of_2(head_dim), 0)."""
    full = triton.next_power_of_2(head_dim)
    first = full if full == head_dim else full // 2
    second = max(triton.next_power_of_2(head_dim - first), 16) if head_dim > first else 0
    return (first, second) if second and first + second < full else (full, 0)


def prefill_config(head_dim: int, is_cuda: bool, max_q: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head_dim and the longest query run of
    the launch; tiny tiles when interpreted."""
    if not is_cuda:  # TRITON_INTERPRET: small tiles so short test sequences span several
        return 16, 16, 4, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    return (128, 64, 8, 3) if max_q >= LONG_QUERIES and head_dim <= 128 else (64, 64, 4, 3)


@triton.jit
def softcap_log2(s, cap_log2):
    """`cap * tanh(x / cap)` of logits `s = x * log2(e)` kept in log2 units (`cap_log2 = cap *
    log2(e)`); tanh as 2 * sigmoid(2y) - 1 (no libdevice call, so it runs interpreted too)."""
    return cap_log2 * (2.0 * tl.sigmoid(2.0 * (s / cap_log2)) - 1.0)


@triton.jit
def key_tile(acc, acc_lo, l_i, m_i, q, q_lo, q_pos, k_ptr, v_ptr, kv_base, n0, hi, window, qk_scale,
          cap_log2, cols, r_lo, r_hi, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
          PAGED: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
          RANGES: tl.constexpr, D_LO: tl.constexpr):  # fmt: skip
    """One online-softmax step over keys [n0, n0 + BLOCK_N); MASKED applies the mask and the
    sequence's tail. `cols`: (dims, dim_mask) of the head's first part and (dims_lo,
    dim_mask_lo) of its second; D_LO > 0 runs the second part (`q_lo`, `acc_lo`) as a narrower
    dot beside each product's first, D_LO == 0 compiles it away (`acc_lo` passes through)."""
    q_start, table, head_off, stride_kt, stride_ko = kv_base
    dims, dim_mask, dims_lo, dim_mask_lo = cols
    pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    valid = pos < hi
    if PAGED:
        page = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = page * stride_kt + (pos % PAGE_SIZE) * stride_ko + head_off
    else:
        kv_off = (q_start + pos).to(tl.int64) * stride_kt + head_off
    kv_mask = valid[:, None] & dim_mask[None, :]
    k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
    if D_LO > 0:  # S = q_hi k_hi^T + q_lo k_lo^T, the second accumulated onto the first
        lo_mask = valid[:, None] & dim_mask_lo[None, :]
        k_lo = tl.load(k_ptr + kv_off[:, None] + dims_lo[None, :], mask=lo_mask, other=0.0)
        v_lo = tl.load(v_ptr + kv_off[:, None] + dims_lo[None, :], mask=lo_mask, other=0.0)
        s = tl.dot(q_lo, tl.trans(k_lo.to(q.dtype)), s, input_precision="ieee")
    s = s * qk_scale
    if SOFTCAP:
        s = softcap_log2(s, cap_log2)
    if MASKED:
        visible = valid[None, :]  # [BLOCK_M, BLOCK_N]
        if MASK < 3:  # causal (not bidirectional, not cross), or inside the query's media range
            seen = pos[None, :] <= q_pos[:, None]
            if RANGES:
                seen = seen | ((pos[None, :] >= r_lo[:, None]) & (pos[None, :] < r_hi[:, None]))
            visible = visible & seen
        if MASK == 1:  # sliding window
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        if MASK == 2:  # chunked local
            visible = visible & (pos[None, :] >= (q_pos[:, None] // window) * window)
        if MASK == 4:  # cross: the rows of the query's range only
            visible = visible & (pos[None, :] >= r_lo[:, None]) & (pos[None, :] < r_hi[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible yet keep m = -inf; shift by 0 there to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    if D_LO > 0:  # [BLOCK_M, D_LO]
        pv_lo = tl.dot(p.to(q.dtype), v_lo.to(q.dtype), input_precision="ieee")
        acc_lo = acc_lo * alpha[:, None] + pv_lo
    return acc, acc_lo, l_i, m_new
