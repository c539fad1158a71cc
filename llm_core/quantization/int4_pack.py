"""INT4 weight packing, as the AWQ (GEMM) and GPTQ formats document it, plus the internal
layout the Triton kernels read. Pure torch: CPU reference, checkpoint writers, tests.

Shapes (nn.Linear's weight is `[N, K]` = [out, in]; G = groups = K / group_size):
  AWQ   qweight int32 [K, N/8]  8 output features per int32, nibble i holds feature
                                8c + AWQ_ORDER[i];  qzeros int32 [G, N/8] (same order);
                                scales fp16 [G, N];  w[n, k] = (q - z) * s of group k // gs
  GPTQ  qweight int32 [K/8, N]  8 input features per int32, nibble i holds k = 8r + i;
                                qzeros int32 [G, N/8] sequential nibbles, stored as z - 1
                                ("gptq" format; "gptq_v2" stores z); scales fp16 [G, N];
                                g_idx int32 [K]: each input feature's group (act order:
                                desc_act=True permutes them)
  ours  qweight int32 [K/8, N]  as GPTQ's qweight, rows sorted by group (act order: `perm`
                                gathers x's features to match); zeros uint8 [G, N] (unpacked,
                                real zero points); scales [G, N] as the checkpoint's.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds feature AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i sits at bits 4i..4i+3


def _pack_last(values: torch.Tensor) -> torch.Tensor:
    """Pack groups of 8 along the last dim (values 0..15, nibble i <- element i) into int32."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)
    packed = (v << _SHIFTS.to(v.device, torch.int64)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement wrap
    return packed.to(torch.int32)


def _unpack_last(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> int32 [..., 8n]: nibble i of each int32 becomes element 8c + i."""
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles.reshape(*packed.shape[:-1], -1)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor):
    """AWQ GEMM layout of `q [K, N]` and `zeros [G, N]` (0..15): (qweight, qzeros) int32."""
    order = torch.tensor(AWQ_ORDER, device=q.device)
    reorder = lambda t: t.reshape(*t.shape[:-1], -1, 8)[..., order].reshape(t.shape)
    return _pack_last(reorder(q)), _pack_last(reorder(zeros))


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor):
    """(q [K, N], zeros [G, N]) int32 from the AWQ GEMM layout."""
    inverse = torch.tensor([AWQ_ORDER.index(i) for i in range(8)], device=qweight.device)
    reorder = lambda t: t.reshape(*t.shape[:-1], -1, 8)[..., inverse].reshape(t.shape)
    return reorder(_unpack_last(qweight)), reorder(_unpack_last(qzeros))


def pack_k(q: torch.Tensor) -> torch.Tensor:
    """`q [K, N]` (0..15) -> int32 [K/8, N], 8 consecutive input features per int32 (GPTQ's
    qweight layout, and ours)."""
    return _pack_last(q.t().contiguous()).t().contiguous()


def unpack_k(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] -> int32 [K, N]."""
    return _unpack_last(qweight.t().contiguous()).t().contiguous()


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, v2: bool = False):
    """GPTQ layout of `q [K, N]`, `zeros [G, N]` (0..15): (qweight [K/8, N], qzeros [G, N/8]);
    the "gptq" (v1) format stores each zero minus one (a zero of 0 wraps to 15)."""
    stored = zeros if v2 else (zeros - 1) & 0xF
    return pack_k(q), _pack_last(stored)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, v2: bool = False):
    """(q [K, N], zeros [G, N]) int32 from the GPTQ layout; v1 zeros are stored + 1 (as the
    format's own kernels read them: a stored 15 is a zero of 16, not 0)."""
    zeros = _unpack_last(qzeros)
    return unpack_k(qweight), zeros if v2 else zeros + 1


def dequantize(q, zeros, scales, g_idx=None) -> torch.Tensor:
    """fp32 `[N, K]` weight from `q [K, N]`, `zeros`/`scales [G, N]` and each input feature's
    group (`g_idx [K]`; None: feature k is in group k // (K / G))."""
    k = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k, device=q.device) // (k // scales.shape[0])
    g_idx = g_idx.long()
    w = (q.float() - zeros.float()[g_idx]) * scales.float()[g_idx]  # [K, N], exact in fp32
    return w.t().contiguous()


def quantize_rtn(weight: torch.Tensor, group_size: int, g_idx=None, sym: bool = False):
    """Round-to-nearest INT4 of `weight [N, K]` per group of input features: (q [K, N],
    zeros [G, N], scales fp16 [G, N]), asymmetric (min/max) or symmetric (zero 8). `g_idx`
    as in `dequantize` (act-order checkpoints). What AWQ/GPTQ produce, minus their search for
    better scales: the same tensors and layout, for tests and dummy weights."""
    n, k = weight.shape
    groups = k // group_size
    if g_idx is None:
        g_idx = torch.arange(k, device=weight.device) // group_size
    w = weight.float().t()  # [K, N]
    lo = torch.full((groups, n), float("inf"), device=w.device)
    hi = torch.full((groups, n), float("-inf"), device=w.device)
    index = g_idx.long()[:, None].expand(k, n)
    lo = lo.scatter_reduce(0, index, w, "amin").clamp(max=0)
    hi = hi.scatter_reduce(0, index, w, "amax").clamp(min=0)
    if sym:
        scales = (torch.maximum(-lo, hi) / 7.5).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8)
    else:
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        zeros = (-lo / scales).round().clamp(0, 15)
    scales = scales.half()  # rounded first: q is computed against the stored scale
    idx = g_idx.long()
    q = (w / scales.float()[idx] + zeros[idx]).round().clamp(0, 15)
    return q.to(torch.int32), zeros.to(torch.int32), scales


def act_order_g_idx(k: int, group_size: int, generator=None) -> torch.Tensor:
    """A desc_act g_idx: input features in a random order, each run of `group_size` of that
    order one group (what GPTQ's act order writes, the order being its Hessian's diagonal)."""
    order = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx
