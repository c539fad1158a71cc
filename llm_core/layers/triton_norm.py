"""Fused norm kernels for Gemma 3's decoder layers and the ViT towers (re-exported by
`triton_ops`, reached through `fused_ops()`):

- `sandwich_norm`: a block's output normalized by its post-norm, added to the residual stream,
  and the sum normalized by the next block's pre-norm, in one pass (two RMSNorm kernels and two
  reads of the stream before);
- `qk_rms_norm_`: the per-head RMSNorm of q and of k in one launch, in place on the views of the
  packed qkv output (one norm kernel each before, plus a copy each: a `[tokens, heads, d]`
  view of the packed rows is not one 2-D matrix);
- `add_layer_norm`: a ViT layer's residual add and the LayerNorm after it (torch's add, then
  its LayerNorm kernel, before).

The RMSNorms compute exactly as `_rms_norm_kernel` does (fp32 math, the same roundings and the
same reduction per row), so their results are those of the kernels they replace; the
LayerNorm's fp32 statistics are summed in another order than torch's (Welford) kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl

# The sandwich kernel reads the residual before its PDL wait, off the wait -> store chain
# (False: after it, as before; for A/B runs, scripts/device/gemma_s26.py).
RESIDUAL_BEFORE_WAIT = True


@triton.jit
def _sandwich_norm_kernel(
    y_ptr,
    res_ptr,
    w_post_ptr,
    w_pre_ptr,
    out_ptr,
    new_res_ptr,
    hidden,
    eps_post,
    eps_pre,
    stride_y,
    stride_r,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_RESIDUAL: tl.constexpr,
):
    """One program per row: x = residual + post(y); out = pre(x), both (1 + w) RMSNorms in
    fp32 with one rounding each, the add rounded like torch's. EARLY_RESIDUAL: the residual
    loads before the PDL wait with the weights (`sandwich_norm` says when that is safe)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w_post = tl.load(w_post_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # static
    w_pre = tl.load(w_pre_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if EARLY_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    pdl.wait(USE_PDL)
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
    if not EARLY_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    h = y.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps_post)
    post = ((h * rstd) * (1.0 + w_post)).to(y.dtype)
    x = (post.to(tl.float32) + r.to(tl.float32)).to(y.dtype)
    tl.store(new_res_ptr + row * hidden + cols, x, mask=mask)
    hx = x.to(tl.float32)
    rstd_x = 1.0 / tl.sqrt(tl.sum(hx * hx, 0) / hidden + eps_pre)
    out = (hx * rstd_x) * (1.0 + w_pre)
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def sandwich_norm(
    y: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor,
    post_eps: float,
    pre_weight: torch.Tensor,
    pre_eps: float,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x = residual + post(y)`, `(pre(x), x)`: Gemma's (1 + w) RMSNorms `post` / `pre` with
    their weights and eps, over the last dim of `y` and `residual` (same shape and dtype).
    `num_warps`: the one program's warps (default: a warp per 256 features, at most 16).
    Under PDL `residual` is read before the wait (`RESIDUAL_BEFORE_WAIT`), with the weights:
    the kernel just before may write `y`, not `residual` (Gemma's residual stream is written
    by the previous block boundary, several kernels earlier; `pdl.py` says why that is
    complete when this kernel starts)."""
    hidden = y.shape[-1]
    y2, r2 = (t.reshape(-1, hidden) for t in (y, residual))  # [rows, hidden]
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    new_res = torch.empty_like(out)
    if y2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        flag = pdl.use_pdl(y2)
        _sandwich_norm_kernel[(y2.shape[0],)](
            y2, r2, post_weight, pre_weight, out, new_res, hidden, post_eps, pre_eps,
            y2.stride(0), r2.stride(0), BLOCK=block,
            num_warps=num_warps or min(16, max(1, block // 256)),
            USE_PDL=flag, launch_pdl=flag, EARLY_RESIDUAL=flag and RESIDUAL_BEFORE_WAIT,
        )  # fmt: skip
    return out.view(y.shape), new_res.view(y.shape)


@triton.jit
def _qk_rms_norm_kernel(
    q_ptr,
    k_ptr,
    wq_ptr,
    wk_ptr,
    q_heads,
    kv_heads,
    head_dim,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
):
    """Program (token, block of `BLOCK_H` heads): the first `cdiv(q_heads, BLOCK_H)` blocks are
    q's heads, the rest k's; each head's vector is normalized in place as `_rms_norm_kernel`
    normalizes a row."""
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(q_heads, BLOCK_H)
    if block < q_blocks:
        base = q_ptr + token * stride_qt
        w_ptr = wq_ptr
        first, stop, stride_h = block * BLOCK_H, q_heads, stride_qh
    else:
        base = k_ptr + token * stride_kt
        w_ptr = wk_ptr
        first, stop, stride_h = (block - q_blocks) * BLOCK_H, kv_heads, stride_kh
    head = first + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (head < stop) & (cols < head_dim)
    ptr = base + head * stride_h + cols
    w = tl.load(w_ptr + cols, mask=cols < head_dim, other=0.0).to(tl.float32)  # static: before
    pdl.wait(USE_PDL)  # the wait
    x = tl.load(ptr, mask=mask, other=0.0)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 1) / head_dim + eps)[:, None]
    if UNIT_OFFSET:
        out = (h * rstd) * (1.0 + w)
    else:
        out = w * (h * rstd).to(x.dtype).to(tl.float32)
    tl.store(ptr, out.to(x.dtype), mask=mask)


def qk_heads_per_program(head_dim: int) -> int:
    """Heads a `qk_rms_norm_` program normalizes: ~2048 elements (a 256-wide head 8 at a time),
    so a 287-token Gemma 3 prefill (24 heads) is 861 programs, not the 6,888 single-warp ones of
    a head each (9.1 us a launch on an H100, thirty-sixth session; ~2.3 us of bytes)."""
    return max(1, 2048 // triton.next_power_of_2(head_dim))


def qk_rms_norm_(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    unit_offset: bool = False,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm each head of `q [T, heads, d]` and `k [T, kv_heads, d]` in place (views of a
    packed qkv are fine: any token and head strides, unit last stride), q's by `q_weight`, k's
    by `k_weight` (`[d]`; `unit_offset`: Gemma's (1 + w)). One eps for both. Returns (q, k).
    Without `unit_offset` the weights must have q's dtype (the result is written in place).
    `heads_per_program`: a power of two (default `qk_heads_per_program`; 1: a head a program)."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "in place: unit last stride"
    assert q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1] and q.dtype == k.dtype
    assert unit_offset or q_weight.dtype == k_weight.dtype == q.dtype
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if tokens:
        block = triton.next_power_of_2(head_dim)
        block_h = min(heads_per_program or qk_heads_per_program(head_dim),
                      triton.next_power_of_2(max(q_heads, kv_heads)))  # fmt: skip
        flag = pdl.use_pdl(q)
        grid = (tokens, triton.cdiv(q_heads, block_h) + triton.cdiv(kv_heads, block_h))
        _qk_rms_norm_kernel[grid](
            q, k, q_weight, k_weight, q_heads, kv_heads, head_dim, eps, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), BLOCK=block, BLOCK_H=block_h, USE_PDL=flag,
            UNIT_OFFSET=unit_offset, num_warps=min(16, max(1, block * block_h // 512)),
            launch_pdl=flag,
        )  # fmt: skip
    return q, k


@triton.jit
def _add_layer_norm_kernel(
    x_ptr,
    delta_ptr,
    delta2_ptr,
    gate_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    sum_ptr,
    hidden,
    eps,
    stride_x,
    stride_d,
    stride_d2,
    length,
    real,
    HAS_DELTA: tl.constexpr,
    KEEP_SUM: tl.constexpr,
    PARTS: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per row: s = x (+ gate * delta, each op rounded like torch's; stored if
    KEEP_SUM); out = LayerNorm(s) in fp32 (mean, then the variance of s - mean), rounded once.
    PARTS: delta in two parts along a sample's `length` rows, its first `real` rows, then the
    rest (`[N, real, hidden]`, `[N, length - real, hidden]`)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # static: before the wait
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl.wait(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        if PARTS:
            n, r = row // length, row % length
            if r < real:
                d = tl.load(delta_ptr + (n * real + r) * stride_d + cols, mask=mask, other=0.0)
            else:
                rest = n * (length - real) + r - real
                d = tl.load(delta2_ptr + rest * stride_d2 + cols, mask=mask, other=0.0)
        else:
            d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
        if GATED:  # torch's gate * delta, rounded to the dtype before the add
            p = tl.load(gate_ptr).to(tl.float32) * d.to(tl.float32)
            if x_ptr.dtype.element_ty == tl.bfloat16:
                # to bf16 (nearest, ties to even) with integer ops: the compiler dropped a
                # cast's rounding here and added the product unrounded (an H100: a quarter of
                # the sums one bf16 step off torch's)
                bits = p.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                p = bits.to(tl.float32, bitcast=True)
            d = p.to(x.dtype)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
        if KEEP_SUM:
            tl.store(sum_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean = tl.sum(h, 0) / hidden
    centered = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / hidden + eps)
    out = centered * rstd * w + b
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """`t` as `[rows, hidden]` with unit column stride."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor | tuple[torch.Tensor, ...] | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    keep_sum: bool = True,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`s = x + gate * delta` (or `x`; `gate` a one-element tensor, None: 1) and `LayerNorm(s)`
    over the last dim with `weight`, `bias`: returns `(s, normed)`, both in x's dtype (delta's
    must match); `(None, normed)` without `keep_sum` (a post-norm block: the sum is never
    written). `delta` may be parts along dim 1 of x `[N, length, hidden]` (one or two: the
    first `real` rows, then the rest), added without building their concatenation. A gate
    in float16 is applied by torch first (the kernel rounds a gated product as torch does in
    bfloat16; in float32 the GPU may fuse it into the add, one rounding)."""
    hidden = x.shape[-1]
    x2 = _rows(x, hidden)  # [rows, hidden]
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    keep = keep_sum and delta is not None
    parts = delta if isinstance(delta, tuple) else (delta,)
    if gate is not None and delta is not None and x.dtype not in (torch.bfloat16, torch.float32):
        parts, gate = tuple(gate * p for p in parts), None
    length = real = 0
    if delta is not None:
        assert all(p.dtype == x.dtype for p in parts)
        if len(parts) == 2:
            length, real = x.shape[1], parts[0].shape[1]
            assert parts[0].shape[0] * length == x2.shape[0] and parts[1].shape[1] == length - real
        else:
            assert parts[0].shape == x.shape
    d2 = [_rows(p, hidden) for p in parts] if delta is not None else [x2]  # x2: unused
    total = torch.empty_like(out) if keep else x2  # x2: never written (KEEP_SUM off)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        flag = pdl.use_pdl(x2)
        _add_layer_norm_kernel[(x2.shape[0],)](
            x2, d2[0], d2[-1], gate if gate is not None else out, weight, bias, out, total,
            hidden, eps, x2.stride(0), d2[0].stride(0), d2[-1].stride(0), length, real,
            HAS_DELTA=delta is not None, KEEP_SUM=keep, PARTS=len(d2) == 2,
            GATED=gate is not None and delta is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)), USE_PDL=flag, launch_pdl=flag,
        )  # fmt: skip
    s = total.view(x.shape) if keep else (x if keep_sum else None)
    return s, out.view(x.shape)


def add_layer_norm_ref(
    x: torch.Tensor,
    delta: torch.Tensor | tuple[torch.Tensor, ...] | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `add_layer_norm`: torch's `x + gate * delta` (`norm.residual_sum`,
    each op rounded to x's dtype), then `F.layer_norm` (statistics and affine in fp32, one
    rounding at the end)."""
    from polymodal.llm_core.layers.norm import residual_sum

    s = residual_sum(x, delta, gate)
    return s, torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps)
