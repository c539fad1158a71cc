"""One Triton launch that readies a fresh prompt's chunk for cuDNN's causal SDPA
(`causal_sdpa.run_fresh`): each token's q and k rotated (neox, fp32 math, one rounding: the bits
of `triton_ops.rotary_embedding`), k and v stored into their paged-cache slots (`store_kv`), and
q / k / v written into new contiguous `[rows, heads, head_dim]` tensors padded with zeros to the
SDPA bucket's `rows` (what `causal_sdpa._rows` copies). Unfused, a layer read and wrote its q / k
three times over (the rotary in place, the store, the copy): at a 4K image's 10.6k tokens
through Qwen2.5-VL-7B's 28 layers, ~11 GB of traffic, of which this moves ~6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl


@triton.jit
def _pack_heads(src, dst, cache, stride_h, cache_h, num_heads, cos_row, sin_row, cached,
                HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                REST: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_H: tl.constexpr,
                CACHE: tl.constexpr):  # fmt: skip
    """One token's `num_heads` heads from `src` (head stride `stride_h`) into `dst` (contiguous
    heads), and into `cache` (head stride `cache_h`) where `CACHE` and `cached`: the first
    2 * HALF features rotated as `triton_ops._rotate_heads`, the REST after them copied."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    live = heads < num_heads
    if HALF > 0:
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = live & (cols < HALF)
        cos = tl.load(cos_row + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        sin = tl.load(sin_row + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        x1 = tl.load(src + heads * stride_h + cols, mask=mask, other=0.0)
        x2 = tl.load(src + heads * stride_h + cols + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        r1 = tl.fma(a, cos, -(b * sin)).to(x1.dtype)
        r2 = tl.fma(b, cos, a * sin).to(x1.dtype)
        tl.store(dst + heads * HEAD_DIM + cols, r1, mask=mask)
        tl.store(dst + heads * HEAD_DIM + cols + HALF, r2, mask=mask)
        if CACHE:
            tl.store(cache + heads * cache_h + cols, r1, mask=mask & cached)
            tl.store(cache + heads * cache_h + cols + HALF, r2, mask=mask & cached)
    if BLOCK_REST > 0:
        cols = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
        mask = live & (cols < HEAD_DIM)
        x = tl.load(src + heads * stride_h + cols, mask=mask)
        tl.store(dst + heads * HEAD_DIM + cols, x, mask=mask)
        if CACHE:
            tl.store(cache + heads * cache_h + cols, x, mask=mask & cached)


@triton.jit
def _zero_heads(dst, num_heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HEAD_DIM)
    tl.store(dst + heads * HEAD_DIM + dims, tl.zeros((BLOCK_H, BLOCK_D), dst.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _pack_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, kc_ptr, vc_ptr, slot_ptr,
    n, num_q_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_cb, stride_co, stride_ch,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """One program a row of the padded outputs: a token's rotated q / k and its v (and its
    k / v into its cache slot; a slot < 0 is not stored), or zeros past the `n` tokens."""
    row = tl.program_id(0).to(tl.int64)
    qo = qo_ptr + row * num_q_heads * HEAD_DIM
    ko = ko_ptr + row * num_kv_heads * HEAD_DIM
    vo = vo_ptr + row * num_kv_heads * HEAD_DIM
    pdl.wait(USE_PDL)  # before any store: the outputs' memory may be what the last launch read
    if row >= n:  # the bucket's padding
        _zero_heads(qo, num_q_heads, HEAD_DIM, BLOCK_QH, BLOCK_D)
        _zero_heads(ko, num_kv_heads, HEAD_DIM, BLOCK_KH, BLOCK_D)
        _zero_heads(vo, num_kv_heads, HEAD_DIM, BLOCK_KH, BLOCK_D)
        return
    slot = tl.load(slot_ptr + row).to(tl.int64)
    cached = slot >= 0
    place = (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_co
    cos_row, sin_row = cos_ptr + row * stride_ct, sin_ptr + row * stride_st
    _pack_heads(q_ptr + row * stride_qt, qo, qo, stride_qh, 0, num_q_heads, cos_row, sin_row,
                cached, HEAD_DIM, HALF, BLOCK_HALF, REST, BLOCK_REST, BLOCK_QH, False)  # fmt: skip
    _pack_heads(k_ptr + row * stride_kt, ko, kc_ptr + place, stride_kh, stride_ch, num_kv_heads,
                cos_row, sin_row, cached, HEAD_DIM, HALF, BLOCK_HALF, REST, BLOCK_REST, BLOCK_KH,
                True)  # fmt: skip
    _pack_heads(v_ptr + row * stride_vt, vo, vc_ptr + place, stride_vh, stride_ch, num_kv_heads,
                cos_row, sin_row, cached, HEAD_DIM, 0, 1, HEAD_DIM, BLOCK_D, BLOCK_KH,
                True)  # fmt: skip


def rope_store_pack(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[n, heads, d]`, k / v `[n, kv_heads, d]` (unrotated; views with a unit last stride)
    -> new contiguous `[rows, heads, d]` / `[rows, kv_heads, d]` tensors: q and k rotated by
    `rope` ((cos, sin) `[n, rotary_dim / 2]`; None: no rotary), v as is, zeros in rows n and
    after. k (rotated) and v are stored at `slot_mapping` in `kv_cache [2, blocks, page,
    kv_heads, d]`, of q's dtype (the fresh SDPA route's; no FP8 scaling)."""
    n, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    assert rows >= n and kv_cache.dtype == q.dtype and kv_cache.stride(-1) == 1
    assert all(x.stride(-1) == 1 for x in (q, k, v)), "unit last stride"
    qo = q.new_empty(rows, heads, head_dim)
    ko, vo = k.new_empty(rows, kv_heads, head_dim), v.new_empty(rows, kv_heads, head_dim)
    if rows == 0:
        return qo, ko, vo
    cos, sin = rope if rope is not None else (q, q)  # unread without a rotary
    half = cos.shape[-1] if rope is not None else 0
    assert rope is None or (cos.stride(-1) == 1 and sin.stride(-1) == 1 and 2 * half <= head_dim)
    rest = head_dim - 2 * half
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    flag = pdl.use_pdl(q)
    _pack_kernel[(rows,)](
        q, k, v, cos, sin, qo, ko, vo, k_cache, v_cache, slot_mapping,
        n, heads, kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        REST=rest, BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_QH=triton.next_power_of_2(heads),
        BLOCK_KH=triton.next_power_of_2(kv_heads), PAGE_SIZE=kv_cache.shape[2],
        USE_PDL=flag, num_warps=4, launch_pdl=flag,
    )  # fmt: skip
    return qo, ko, vo
