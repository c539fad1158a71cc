"""Decoder linear layers: `Linear` (its weights and matmul owned by a `LinearMethod`) and
`PackedLinear` (checkpoint tensors stored apart, run as one matmul).

`LinearMethod` is the seam for how a layer stores and multiplies its weight: the unquantized
method (with the Triton GEMV for few-row inputs, `enable_gemv`) today; FP8 / INT4 weights,
tensor-parallel shards and LoRA plug in as other methods. `Linear.forward(x)` is the plain
product. Fused work around it is requested by the call site that wants it (`Linear.fused`):
SiLU*mul of a packed `[gate | up]` input applied as x loads, and the residual add with the
next RMSNorm's statistics in the epilogue (`AddedResidual`, norm.py); a method folds what it
can and the caller finishes the rest (`add_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.norm import DeferredNorm

# Inputs of at most this many rows take the GEMV when enabled: measured on an H200, it beats
# cuBLAS at one row (batch-1 decode) and loses from two rows up (docs/performance.md).
GEMV_MAX_ROWS = 1
GEMV_DTYPES = (torch.float16, torch.bfloat16)


class LinearMethod:
    """How a `Linear` holds its weight and computes `x @ W^T + b`."""

    #: whether `enable_gemv` may route this method's few-row calls to the Triton GEMV
    supports_gemv = False

    def create_weights(self, layer: Linear, dtype=None, device=None) -> None:
        """Register the layer's parameters (sizes: `layer.in_features`, `out_features`)."""
        raise NotImplementedError

    def apply(self, layer: Linear, x, silu_mul: bool = False, residual=None):
        """`x @ W^T + b`. `x`: a tensor or a `DeferredNorm`; `silu_mul`: x is `[gate | up]`
        and the product uses `silu(gate) * up`. `residual` given: the method may fold the add
        and return an `AddedResidual`; otherwise it returns the plain output (the caller adds).
        """
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """Dense weights in the model dtype: `F.linear`, or the Triton GEMV (`layer.gemv`, set by
    `enable_gemv`) for inputs of <= `GEMV_MAX_ROWS` rows, which folds SiLU*mul, a deferred
    RMSNorm of x and the residual add into the one kernel."""

    supports_gemv = True

    def create_weights(self, layer: Linear, dtype=None, device=None) -> None:
        shape = (layer.out_features, layer.in_features)
        layer.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        bias = (
            torch.empty(layer.out_features, dtype=dtype, device=device) if layer.has_bias else None
        )
        layer.bias = None if bias is None else nn.Parameter(bias)
        bound = layer.in_features**-0.5  # nn.Linear's init, so unloaded layers stay finite
        nn.init.uniform_(layer.weight, -bound, bound)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -bound, bound)

    def uses_gemv(self, layer: Linear, x) -> bool:
        x = x.h if isinstance(x, DeferredNorm) else x
        return layer.gemv is not None and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS

    def apply(self, layer: Linear, x, silu_mul: bool = False, residual=None):
        if self.uses_gemv(layer, x):
            return layer.gemv(x, layer.weight, layer.bias, silu_mul=silu_mul, residual=residual)
        if isinstance(x, DeferredNorm):
            x = x.materialize()
        if silu_mul:
            x = silu_and_mul(x)
        return F.linear(x, layer.weight, layer.bias)


UNQUANTIZED = UnquantizedLinearMethod()


class Linear(nn.Module):
    """A linear layer whose weights and matmul belong to its `method` (default: unquantized).

    `gemv` is None (plain `F.linear`) unless `enable_gemv` set it at model build time.
    """

    gemv = None  # `layers.gemv.gemv(x, weight, bias, silu_mul=False, residual=None)` or alike

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: LinearMethod | None = None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.method = method or UNQUANTIZED
        self.method.create_weights(self, dtype, device)

    def uses_gemv(self, x) -> bool:
        """Whether `x` (2-D, rows first; or a `DeferredNorm` of such) goes through the GEMV."""
        return isinstance(self.method, UnquantizedLinearMethod) and self.method.uses_gemv(self, x)

    def forward(self, x) -> torch.Tensor:
        """The plain product. `x`: a tensor or a `DeferredNorm` (normalized as the GEMV loads
        it, else first)."""
        return self.method.apply(self, x)

    def fused(self, x, residual: torch.Tensor | None = None, silu_mul: bool = False):
        """The product with the fused work this call site asks for: `silu_mul` (x is a packed
        `[gate | up]`, activated as it loads) and the `residual` add. Where the method folds
        the add (the GEMV) an `AddedResidual` comes back; otherwise the plain output, and the
        caller adds (`add_norm` takes either)."""
        return self.method.apply(self, x, silu_mul=silu_mul, residual=residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"bias={self.has_bias}, method={type(self.method).__name__}"
        )


def enable_gemv(model: nn.Module) -> int:
    """Route few-row calls of every `Linear` in `model` with half/bf16 CUDA weights through the
    Triton GEMV (`EngineConfig.decode_gemv`). Returns how many layers it set; others unchanged."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, Linear)
        and m.method.supports_gemv
        and m.weight.is_cuda
        and m.weight.dtype in GEMV_DTYPES
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

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict,
        bias: bool,
        method: LinearMethod | None = None,
        dtype=None,
        device=None,
    ):
        out_features = sum(shard_sizes.values())
        super().__init__(in_features, out_features, bias, method, dtype=dtype, device=device)
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
