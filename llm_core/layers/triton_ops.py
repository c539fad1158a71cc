"""Fused elementwise Triton kernels for the decoder: RMSNorm (+ residual add), SiLU-and-mul,
neox rotary embedding. Each has a torch reference `*_ref` beside it with the same semantics
(used by tests and as the definition of what the kernel computes).

All math is fp32 inside the kernels; results are cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: h = x (+ residual); out = w * (h * rsqrt(mean(h^2) + eps))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + r
        tl.store(new_res_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps)
    normed = (h * rstd).to(x.dtype).to(tl.float32)  # HF casts before scaling by the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (add +) RMSNorm over the last dim. Returns `(out, new_residual)`.

    With `residual`, `h = x + residual` and `new_residual = h`; without, `new_residual = x`.
    `out` has dtype `promote(x, weight)`, like HF's `weight * h.to(dtype)`.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [rows, hidden]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        new_res = torch.empty_like(x2, memory_format=torch.contiguous_format)
    else:
        r2 = new_res = x2  # unused by the kernel
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, new_res, hidden, eps, x2.stride(0), r2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    new_residual = new_res.view(x.shape) if residual is not None else x
    return out.view(x.shape), new_residual


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rms_norm` (HF LlamaRMSNorm, with the residual add before it)."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr):
    """Program (row, chunk): out[row, c] = silu(x[row, c]) * x[row, d + c]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`x [..., 2d] = [gate | up]` -> `silu(gate) * up` of shape `[..., d]`."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)  # [rows, 2d]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], d)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_and_mul` (fp32 math, one rounding)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    num_heads,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """One program per token: rotate x[t, :, :2*HALF] of every head, neox style, in place."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(cos_ptr + token * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_st + cols, mask=col_mask, other=0.0).to(tl.float32)
    mask = (heads[:, None] < num_heads) & col_mask[None, :]
    ptr1 = x_ptr + token * stride_xt + heads[:, None] * stride_xh + cols[None, :]  # first half
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr1, (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(ptr1 + HALF, (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=mask)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding applied in place to `q [T, heads, D]` and `k [T, kv_heads, D]`.

    `cos, sin`: `[T, rotary_dim / 2]`, already gathered per token (M-RoPE sections merged by the
    caller). Only the first `rotary_dim` features rotate. Views (e.g. slices of a packed qkv)
    are fine as long as the last dim has unit stride. Returns `(q, k)`.
    """
    half = cos.shape[-1]
    assert 2 * half <= q.shape[-1] and cos.shape == sin.shape
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1, "cos/sin need a unit last stride"
    for x in (q, k):
        assert x.stride(-1) == 1, "rotary_embedding works in place: x needs a unit last stride"
        if x.shape[0] == 0:
            continue
        _rotary_kernel[(x.shape[0],)](
            x, cos, sin, x.shape[1], x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            HALF=half, BLOCK_H=triton.next_power_of_2(x.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    return q, k


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rotary_embedding` (returns new tensors; fp32 math, one rounding)."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = cos.shape[-1]
        c, s = cos.float()[:, None, :], sin.float()[:, None, :]  # broadcast over heads
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
        return torch.cat([rot, x[..., 2 * half :]], dim=-1)

    return rotate(q), rotate(k)
