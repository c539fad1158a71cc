"""Decoder linear layers: `Linear` (opt-in Triton GEMV for a few rows) and `PackedLinear`
(checkpoint tensors stored apart, run as one matmul)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.layers.norm import DeferredNorm

# Inputs of at most this many rows take the GEMV when enabled: measured on an H200, it beats
# cuBLAS at one row (batch-1 decode) and loses from two rows up (docs/performance.md).
GEMV_MAX_ROWS = 1
GEMV_DTYPES = (torch.float16, torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` that runs inputs of <= `GEMV_MAX_ROWS` rows through `self.gemv` when set.

    `gemv` is None (plain `F.linear`) unless `enable_gemv` set it at model build time.
    """

    gemv = None  # `layers.gemv.gemv(x, weight, bias, silu_mul=False, residual=None)` or alike

    def uses_gemv(self, x) -> bool:
        """Whether `x` (2-D, rows first; or a `DeferredNorm` of such) goes through the GEMV."""
        x = x.h if isinstance(x, DeferredNorm) else x
        return self.gemv is not None and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS

    def forward(self, x, residual: torch.Tensor | None = None):
        """`x`: a tensor or a `DeferredNorm` (normalized as the GEMV loads it, else first).
        `residual`: the stream the output is added to next. The GEMV folds that add in and
        returns an `AddedResidual`; otherwise the plain output comes back (the caller adds)."""
        if self.uses_gemv(x):
            return self.gemv(x, self.weight, self.bias, residual=residual)
        if isinstance(x, DeferredNorm):
            x = x.materialize()
        return F.linear(x, self.weight, self.bias)


def enable_gemv(model: nn.Module) -> int:
    """Route few-row calls of every `Linear` in `model` with half/bf16 CUDA weights through the
    Triton GEMV (`EngineConfig.decode_gemv`). Returns how many layers it set; others unchanged."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, Linear) and m.weight.is_cuda and m.weight.dtype in GEMV_DTYPES
    ]
    if not layers:
        return 0
    try:
        from polymodal.llm_core.layers.gemv import gemv
    except ImportError:  # no Triton
        return 0
    for layer in layers:
        layer.gemv = gemv
    return len(layers)


class PackedLinear(Linear):
    """`Linear` whose output rows stack several checkpoint projections (q/k/v, gate/up).

    `shard_sizes` maps a shard id (as in the model's `packed_modules_mapping`) to its rows.
    A checkpoint that already stores the fused tensor loads it whole.
    """

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool, dtype=None, device=None):
        super().__init__(in_features, sum(shard_sizes.values()), bias, dtype=dtype, device=device)
        offsets, start = {}, 0
        for shard_id, size in shard_sizes.items():
            offsets[shard_id] = (start, size)
            start += size
        self.shard_offsets = offsets
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard
                param.shard_ids = list(shard_sizes)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # already fused in the checkpoint (Phi-3)
            if param.shape != tensor.shape:
                raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(tensor)
            return
        start, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, start, size)
        if target.shape != tensor.shape:
            raise ValueError(
                f"shard {shard_id!r} shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}"
            )
        target.copy_(tensor)
