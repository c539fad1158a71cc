"""RMSNorm with an optional fused residual add (Triton on CUDA, torch elsewhere), and the
deferred form a few-row decode step uses: the residual add done in the GEMV before (its
epilogue, `AddedResidual`), the normalization in the GEMV after (as it loads x, `DeferredNorm`).
Gemma's sandwich boundary (`sandwich_norm`: post-norm, add, next pre-norm), per-head q/k
norms (`qk_norm`) and a residual add + LayerNorm (`add_layer_norm`: a ViT layer's pre-norm,
`LayerNorm(x, residual)` for BERT's post-norm) are one kernel each on CUDA; at one row the
sandwich's post-norm and add fold into the GEMV before (`Linear.fused(post_norm=)`) and its
pre-norm into the GEMV after (a unit-offset `DeferredNorm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.layers import fused_ops


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual); like HF: normalize in fp32, cast, then scale."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def gemma_rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's `(x * rsqrt(mean(x^2) + eps)) * (1 + weight)` in fp32, cast once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


class RMSNorm(nn.Module):
    """`forward(x, residual=None) -> normed` or `(normed, x + residual)` when residual given."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def reset_parameters(self) -> None:
        """The identity scale (a tower built uninitialized, given dummy weights)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and fused_ops() is not None:
            out, res = fused_ops().rms_norm(x, self.weight, self.eps, residual)
        else:
            out, res = rms_norm_torch(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, HF names) whose `forward(x, residual=None)` normalizes
    `x + residual` (BERT's post-norm blocks), through `add_layer_norm` without keeping the
    sum."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return add_layer_norm(self, x, residual, keep_sum=False)[1]


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: `(x * rsqrt(mean(x^2) + eps)) * (1 + weight)` in fp32, cast once
    (weights stored as offsets from 1, initialized to 0). `forward(x, residual=None)` as
    `RMSNorm`'s: with a residual, returns `(norm(x + residual), x + residual)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def reset_parameters(self) -> None:
        """The identity scale: offsets of 0."""
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and fused_ops() is not None:
            out, res = fused_ops().rms_norm(x, self.weight, self.eps, residual, unit_offset=True)
        else:
            res = x if residual is None else x + residual
            out = gemma_rms_norm_torch(res, self.weight, self.eps)
        return out if residual is None else (out, res)


def sandwich_norm(post: GemmaRMSNorm, pre: GemmaRMSNorm, y, residual: torch.Tensor):
    """Gemma's block boundary: `x = residual + post(y)` (a block's output normalized before it
    joins the residual stream), returns `(pre(x), x)`; one kernel on CUDA. `y` may be an
    `AddedResidual` whose GEMV did the post-norm and the add (`Linear.fused(post_norm=)`):
    then `pre` is deferred to the next GEMV (a `DeferredNorm` with Gemma's unit offset)."""
    if isinstance(y, AddedResidual):
        return DeferredNorm(y.h, y.sumsq, pre.weight, pre.eps, unit_offset=True), y.h
    if y.is_cuda and fused_ops() is not None:
        return fused_ops().sandwich_norm(y, residual, post.weight, post.eps, pre.weight, pre.eps)
    return pre(post(y), residual)


class QKNorms(NamedTuple):
    """q's and k's per-head RMSNorms as `qk_rms_norm_` computes them (`unit_offset`: Gemma's
    `(1 + w)`), handed to a kernel that applies them as it loads q and k (paged decode)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    unit_offset: bool


def foldable_qk_norms(q_norm: nn.Module, k_norm: nn.Module, q: torch.Tensor) -> QKNorms | None:
    """The norms as a kernel folds them, where `qk_norm` would run its one kernel (RMSNorms or
    GemmaRMSNorms of one eps; RMSNorm weights in q's dtype: the same roundings), else None."""
    if type(q_norm) is not type(k_norm) or q_norm.eps != k_norm.eps:
        return None
    unit = isinstance(q_norm, GemmaRMSNorm)
    if not (unit or isinstance(q_norm, RMSNorm) and q_norm.weight.dtype == q.dtype):
        return None
    return QKNorms(q_norm.weight, k_norm.weight, q_norm.eps, unit)


def qk_norm(q_norm: nn.Module, k_norm: nn.Module, q: torch.Tensor, k: torch.Tensor):
    """`(q_norm(q), k_norm(k))` per head of `q [T, heads, d]`, `k [T, kv_heads, d]` (RMSNorms
    or GemmaRMSNorms of one eps). On CUDA one kernel normalizes both in place (q and k must be
    this step's own tensors, e.g. views of the packed qkv output)."""
    same = type(q_norm) is type(k_norm) and q_norm.eps == k_norm.eps
    if same and q.is_cuda and fused_ops() is not None:
        unit = isinstance(q_norm, GemmaRMSNorm)
        if unit or q_norm.weight.dtype == q.dtype:
            return fused_ops().qk_rms_norm_(q, k, q_norm.weight, k_norm.weight, q_norm.eps, unit)
    return q_norm(q), k_norm(k)


def residual_sum(x: torch.Tensor, delta=None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """`x + gate * delta` as eager torch rounds it (`delta` None: x; `gate` None: 1; `delta` a
    tuple: parts along dim 1, concatenated)."""
    if delta is None:
        return x
    if isinstance(delta, tuple):
        delta = delta[0] if len(delta) == 1 else torch.cat(delta, dim=1)
    return x + (delta if gate is None else gate * delta)


def add_layer_norm(
    norm: nn.LayerNorm,
    x: torch.Tensor,
    delta: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    keep_sum: bool = True,
    gate: torch.Tensor | None = None,
):
    """A residual add and the LayerNorm after it: `s = x + gate * delta` (`residual_sum`),
    returns `(s, norm(s))` (`(None, norm(s))` when the caller has no use for the sum, as a
    post-norm block); one kernel on CUDA (an affine LayerNorm over the last dim; `delta` may
    be two parts along dim 1, the first `real` rows and the rest): each op's rounding and the
    fp32 statistics as eager torch's."""
    affine = norm.weight is not None and norm.bias is not None
    if x.is_cuda and fused_ops() is not None and affine and len(norm.normalized_shape) == 1:
        ops = fused_ops()
        return ops.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps, keep_sum, gate)
    s = residual_sum(x, delta, gate)
    out = F.layer_norm(s, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return (s if keep_sum else None), out


@dataclass
class AddedResidual:
    """A block's output already added to the residual stream by the GEMV that produced it:
    `h = out + residual` `[M, N]` (Gemma: `residual + post_norm(out)`), and the sums of h^2
    over each of its feature blocks (`sumsq [M, blocks]` fp32; Gemma: one block), which is
    what an RMSNorm of `h` needs besides h."""

    h: torch.Tensor
    sumsq: torch.Tensor


@dataclass
class DeferredNorm:
    """`RMSNorm(weight, eps)(h)` not computed yet (`unit_offset`: `GemmaRMSNorm`'s): a GEMV that
    takes it normalizes each row as it loads it (`layers.gemv`); anything else calls
    `materialize()` (`plain()` does where a kernel has no unit-offset fold)."""

    h: torch.Tensor
    sumsq: torch.Tensor
    weight: torch.Tensor
    eps: float
    unit_offset: bool = False

    def materialize(self) -> torch.Tensor:
        if self.h.is_cuda and fused_ops() is not None:
            ops = fused_ops()
            return ops.rms_norm(self.h, self.weight, self.eps, unit_offset=self.unit_offset)[0]
        if self.unit_offset:
            return gemma_rms_norm_torch(self.h, self.weight, self.eps)
        return rms_norm_torch(self.h, self.weight, self.eps)[0]


def plain(x):
    """`x` for a kernel whose deferred-norm fold is the plain RMSNorm's: a unit-offset
    `DeferredNorm` (Gemma's) materialized, anything else as is."""
    if isinstance(x, DeferredNorm) and x.unit_offset:
        return x.materialize()
    return x


def add_norm(norm: RMSNorm, hidden, residual: torch.Tensor | None):
    """The next block's input and the new residual stream: `norm(hidden + residual)` and
    `hidden + residual` (no residual yet: `norm(hidden)`, `hidden`). When `hidden` is an
    `AddedResidual` the add is done and the norm is deferred to the next GEMV."""
    if isinstance(hidden, AddedResidual):
        return DeferredNorm(hidden.h, hidden.sumsq, norm.weight, norm.eps), hidden.h
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)
