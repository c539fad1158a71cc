"""The paged decode kernel's steps (`triton_decode.py`): the rotary of a new token's q / k as it
loads (`rotate`), a key tile's cache offsets through the block table (`kv_offsets`), one tile's
online-softmax update (`attend_tile`, logits soft-capped as the prefill kernel's) and the
log-sum-exp merge of a head's split partials (`merge_splits`)."""

from __future__ import annotations

import triton
import triton.language as tl

from polymodal.llm_core.attention.prefill_tiles import softcap_log2


@triton.jit
def rotate(row_ptr, dims, partner, mask, cos, sin, lower):
    """Neox rotary of the features at `dims` of the rows at `row_ptr` (loaded here): x*cos -
    partner*sin in the lower half, x*cos + partner*sin in the upper (cos 1, sin 0 past the
    rotated features), in fp32 rounded once to the input dtype: the same fma and product as
    `triton_ops.rotary_embedding`, so the same bits."""
    x = tl.load(row_ptr + dims, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    ps = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32) * sin
    return tl.where(lower, tl.fma(xf, cos, -ps), tl.fma(xf, cos, ps)).to(x.dtype)


@triton.jit
def norm_rotate(row_ptr, dims, partner, mask, cos, sin, lower, w, w_partner, eps,
                HEAD_DIM: tl.constexpr, UNIT_OFFSET: tl.constexpr, AXIS: tl.constexpr):  # fmt: skip
    """`rotate` of the rows' per-head RMSNorm (`w`, `w_partner`: the norm weight at `dims`
    and at `partner`, fp32; `AXIS`: the rows' feature axis): the norm computed as
    `_qk_rms_norm_kernel` computes it (fp32 statistics over `HEAD_DIM`; rounded to the input
    dtype as it stores) and the rotation as `rotate`: the two kernels' result up to the order
    of the sum of squares."""
    x = tl.load(row_ptr + dims, mask=mask, other=0.0)
    h = x.to(tl.float32)
    hp = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=AXIS, keep_dims=True) / HEAD_DIM + eps)
    if UNIT_OFFSET:  # Gemma: scaled in fp32, rounded once
        n = ((h * rstd) * (1.0 + w)).to(x.dtype).to(tl.float32)
        n_partner = ((hp * rstd) * (1.0 + w_partner)).to(x.dtype).to(tl.float32)
    else:  # HF rounds the normalized row before scaling by the weight
        n = (w * (h * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
        n_partner = (w_partner * (hp * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
        n_partner = n_partner.to(tl.float32)
    ps = n_partner * sin
    return tl.where(lower, tl.fma(n, cos, -ps), tl.fma(n, cos, ps)).to(x.dtype)


@triton.jit
def kv_offsets(table, pos, valid, kv_head, stride_cb, stride_co, stride_ch,
                PAGE_SIZE: tl.constexpr):  # fmt: skip
    """Cache offsets of the keys at `pos` (one kv head) through the sequence's block table."""
    page = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    return page * stride_cb + (pos % PAGE_SIZE) * stride_co + kv_head * stride_ch


@triton.jit
def attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Online-softmax update of (max, sum, output) with one tile of keys (invalid: -inf)."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * qk_scale  # log2 units
    if SOFTCAP:
        s = softcap_log2(s, cap_log2)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def merge_splits(part_out_ptr, part_lse_ptr, out_ptr, head_base, seq, heads, dims, row_mask,
                  out_mask, stride_os, stride_oh, active, HEAD_DIM: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                  UNROLL: tl.constexpr):  # fmt: skip
    """out[head] = log-sum-exp weighted average of the `active` split partials of each head
    (`BLOCK_S` >= the launch's splits). The merging program is the last split to finish, so
    its loads are the kernel's tail: every split's LSE comes in one load, and the partials
    `UNROLL` at a time (independent loads in flight, not one round trip a split), summed in
    split order."""
    splits = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + head_base[:, None] + splits[None, :],
                  mask=row_mask[:, None] & (splits < active)[None, :], other=float("-inf"),
                  cache_modifier=".cg")  # [BLOCK_G, BLOCK_S]  # fmt: skip
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty -> zeros
    weights = tl.exp2(lse - m[:, None])  # unused splits: 0
    total = tl.sum(weights, 1)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, active, UNROLL):
        for u in tl.static_range(UNROLL):
            s = s0 + u
            part = tl.load(
                part_out_ptr + (head_base + s)[:, None] * HEAD_DIM + dims[None, :],
                mask=out_mask & (s < active),
                other=0.0,
                cache_modifier=".cg",
            )
            w = tl.sum(tl.where(splits[None, :] == s, weights, 0.0), 1)  # [BLOCK_G]
            acc += part * w[:, None]
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    o_off = seq * stride_os + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)
