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

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.layers.activation import gelu_tanh_and_mul, silu_and_mul
from polymodal.llm_core.layers.norm import DeferredNorm, plain

# Inputs of at most this many rows take the GEMV when enabled: measured on an H200, it beats
# cuBLAS at one row (batch-1 decode) and loses from two rows up (docs/performance.md).
GEMV_MAX_ROWS = 1
GEMV_DTYPES = (torch.float16, torch.bfloat16)
# Gemma's one-row epilogue folds (the sandwich post-norm + add, GELU-tanh * up) in the GEMV:
# off, measured slower on an H200 (Gemma-3-12B batch-1 decode, 2026-12-05,
# scripts/device/gemma_variants.py: 81.7% of the floor folded, 83.9% with the `sandwich_norm`
# and activation kernels between the GEMVs). The kernels keep them (tests/llm_core/
# test_triton_gemv.py); set True to measure them again.
FOLD_GEMMA_EPILOGUES = False
# Set by `deferred_weights()`: Linears built meanwhile without an explicit method allocate
# their weights on the meta device until `Linear.set_method` gives them their real method.
_DEFERRED = contextvars.ContextVar("polymodal_deferred_linear_weights", default=False)


class LinearMethod:
    """How a `Linear` holds its weight and computes `x @ W^T + b`."""

    #: whether `enable_gemv` may route this method's few-row calls to the Triton GEMV
    supports_gemv = False

    def create_weights(self, layer: Linear, dtype=None, device=None) -> None:
        """Register the layer's parameters (sizes: `layer.in_features`, `out_features`).

        Parameters split by output feature (packed q/k/v, gate/up) say along which dim with
        `param.output_dim` (default 0; None: not split, every shard loads it whole) and how
        many output features one stored element holds with `param.pack_factor` (default 1);
        `param.broadcast = True` lets a one-element checkpoint tensor fill the whole slice (a
        per-tensor scale kept per output channel)."""
        raise NotImplementedError

    def process_weights(self, layer: Linear) -> None:
        """After loading: derive the tensors the kernels read (repacked, quantized on load)."""

    def randomize(self, layer: Linear) -> bool:
        """Fill the layer with random weights for `dummy_weights` builds; False: the loader's
        default (normal floats for 2-D parameters) suits this method."""
        return False

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

    gemv = None  # `layers.gemv.gemv(x, weight, bias, ..., residual=, post_norm=)` or alike
    parallel = None  # a tensor-parallel shard (layers/parallel.py): None on one rank

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: LinearMethod | None = None,
        dtype=None,
        device=None,
        parallel=None,
    ):
        """`in_features` / `out_features`: this rank's (the whole layer on one rank);
        `parallel`: its shard (`layers/parallel.py`), which narrows each checkpoint tensor as it
        loads and wraps the method (the row shard's all-reduce)."""
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.method = method or UNQUANTIZED
        if parallel is not None:
            self.parallel = parallel
            self.method = parallel.wrap(self.method)
        if method is None and _DEFERRED.get():
            device = "meta"  # `set_method` allocates the real weights
        self.method.create_weights(self, dtype, device)
        self._bind_loaders()

    @property
    def is_deferred(self) -> bool:
        """Built under `deferred_weights()` and not given its method yet."""
        return any(p.is_meta for p in self._parameters.values() if p is not None)

    def set_method(self, method: LinearMethod, dtype=None, device=None) -> None:
        """Replace the layer's weights with fresh ones of `method` (a deferred layer's meta
        weights; or any layer's, whose loaded values are then lost)."""
        for name in list(self._parameters):
            del self._parameters[name]
        self.method = method
        method.create_weights(self, dtype, device)
        self._bind_loaders()

    def post_load(self) -> None:
        """Called by the loader after the checkpoint is in: the method's `process_weights`."""
        self.method.process_weights(self)

    def _bind_loaders(self) -> None:
        for param in self._parameters.values():
            if param is not None:
                param.weight_loader = self._load_param
                if getattr(self, "shard_offsets", None):
                    param.shard_ids = list(self.shard_offsets)

    def _load_param(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        """Copy a checkpoint tensor into `param`, or into its shard's slice of the output
        features (`PackedLinear`); `shard_id=None` is the whole parameter (a checkpoint that
        stores the fused tensor, or a plain layer)."""
        target, dim = param.data, getattr(param, "output_dim", 0)
        if self.parallel is not None:  # this rank's slice of the checkpoint tensor
            tensor = self.parallel.narrow(self, param, tensor, shard_id)
        if shard_id is not None and dim is not None:
            start, size = self.shard_offsets[shard_id]
            pack = getattr(param, "pack_factor", 1)
            target = target.narrow(dim, start // pack, size // pack)
        if shard_id is not None and dim is None:  # one tensor every shard carries (g_idx)
            if getattr(param, "loaded_by_a_shard", False) and not torch.equal(
                target, tensor.to(target.device, target.dtype)
            ):
                raise ValueError(f"shard {shard_id!r} differs from its fused layer's other shards")
            param.loaded_by_a_shard = True
        if getattr(param, "broadcast", False) and tensor.numel() == 1:
            target.fill_(tensor.reshape(()).item())
            return
        if target.shape != tensor.shape:
            what = "shape" if shard_id is None or dim is None else f"shard {shard_id!r} shape"
            raise ValueError(f"{what} {tuple(tensor.shape)} does not fit {tuple(target.shape)}")
        target.copy_(tensor)

    def uses_gemv(self, x) -> bool:
        """Whether `x` (2-D, rows first; or a `DeferredNorm` of such) goes through the GEMV."""
        return isinstance(self.method, UnquantizedLinearMethod) and self.method.uses_gemv(self, x)

    def forward(self, x) -> torch.Tensor:
        """The plain product. `x`: a tensor or a `DeferredNorm` (normalized as the GEMV loads
        it, else first)."""
        return self.method.apply(self, self._input(x))

    def _input(self, x):
        """`x` as the method takes it: a Gemma (unit-offset) `DeferredNorm` only the 16-bit
        GEMV folds; the other methods get it normalized (one isinstance for anything else)."""
        if isinstance(x, DeferredNorm) and x.unit_offset and not self.uses_gemv(x):
            return plain(x)
        return x

    def fused(self, x, residual: torch.Tensor | None = None, silu_mul: bool = False,
              post_norm: nn.Module | None = None, gelu_tanh: bool = False):  # fmt: skip
        """The product with the fused work this call site asks for: `silu_mul` (x is a packed
        `[gate | up]`, activated as it loads; `gelu_tanh`: by GELU-tanh, Gemma's) and the
        `residual` add. Where the method folds the add (the GEMV) an `AddedResidual` comes
        back; otherwise the plain output, and the caller adds (`add_norm` takes either).
        `post_norm` (a `GemmaRMSNorm`, with `residual`): the output is normalized by it before
        the add; only the 16-bit GEMV folds that and GELU-tanh, with `FOLD_GEMMA_EPILOGUES`
        (`sandwich_norm` takes either)."""
        x = self._input(x)
        folds = FOLD_GEMMA_EPILOGUES and (post_norm is not None or gelu_tanh)
        if folds and self.uses_gemv(x):
            fold = None if post_norm is None else (post_norm.weight, post_norm.eps)
            return self.gemv(x, self.weight, self.bias, silu_mul=silu_mul, residual=residual,
                             post_norm=fold, gelu_tanh=gelu_tanh)  # fmt: skip
        if gelu_tanh and silu_mul:
            x, silu_mul = gelu_tanh_and_mul(x), False
        if post_norm is not None:  # the caller normalizes and adds
            return self.method.apply(self, x, silu_mul=silu_mul)
        return self.method.apply(self, x, silu_mul=silu_mul, residual=residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"bias={self.has_bias}, method={type(self.method).__name__}"
        )


@contextlib.contextmanager
def deferred_weights():
    """Inside, `Linear`s built without an explicit method put their weights on the meta
    device: a quantized build gives each its method by name afterwards (`set_method`), so
    the 16-bit weights of a quantized model are never allocated."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


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
        parallel=None,
    ):
        out_features = sum(shard_sizes.values())
        super().__init__(in_features, out_features, bias, method, dtype, device, parallel)
        offsets, start = {}, 0
        for shard_id, size in shard_sizes.items():
            offsets[shard_id] = (start, size)
            start += size
        self.shard_offsets = offsets
        self._bind_loaders()
