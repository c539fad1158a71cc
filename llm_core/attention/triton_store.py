"""Triton kernel writing new keys/values into their paged-cache slots (`store_kv`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl

FP8_MAX = tl.constexpr(448.0)  # a global a kernel reads must be a constexpr


@triton.jit
def fp8_scaled(x, scale):
    """x / scale, saturated to E4M3's range (fp32; the store casts)."""
    return tl.minimum(tl.maximum(x.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,  # cache stride of a block
    stride_co,  # cache stride of an offset inside a block
    stride_ch,  # cache stride of a kv head
    num_kv_heads,
    k_scale,  # FP8 cache: stored values are k / k_scale, v / v_scale, saturated (FP8)
    v_scale,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
    FP8: tl.constexpr = False,
):
    """One program per token: copy its `[kv_heads, head_dim]` k and v rows into its slot."""
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # the host's, written before: ahead of the wait
    pdl.wait(USE_PDL)
    if slot < 0:  # padding token: nothing to store
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)
    src_k = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = block * stride_cb + offset * stride_co + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    if FP8:
        k = fp8_scaled(k, k_scale)
        v = fp8_scaled(v, v_scale)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[float, float] | None = None,
) -> None:
    """Write `k, v [num_tokens, kv_heads, head_dim]` into `kv_cache` at `slot_mapping` (-1 skips).

    `kv_cache` is `[2, num_blocks, block_size, kv_heads, head_dim]` with a unit last stride; an
    FP8 cache stores `k / k_scale` and `v / v_scale` (`kv_scales`, default 1.0), saturated.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, kv_heads, head_dim]
    assert k_cache.stride(-1) == 1, "kv_cache needs a unit stride on head_dim"
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        *(kv_scales or (1.0, 1.0)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=kv_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        USE_PDL=pdl.use_pdl(k),
        FP8=kv_cache.dtype == torch.float8_e4m3fn,
        launch_pdl=pdl.use_pdl(k),
    )
