"""INT4 weight-only linears (W4A16): AWQ (GEMM layout) and GPTQ (desc_act false or true).

Each format loads its checkpoint tensors as stored (`create_weights` registers them with the
checkpoint's names and shapes, so packed q/k/v and gate/up shards slice along the output
features), then `process_weights` turns them into the one layout the kernels read
(`int4_pack.py`): K-packed `qweight`, unpacked `zeros`, `scales`, and for act-order GPTQ the
`perm` that sorts input features by group. On CUDA, <= 4 rows take the Triton GEMV
(`layers/int4_gemv.py`), up to 127 the Triton GEMM, from `INT4_DENSE_MIN_ROWS` (128) a
dequantized copy of the weight and cuBLAS (both `layers/int4_kernels.py`); elsewhere the
dequantized weight runs through `F.linear` (the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.linear import Linear, LinearMethod
from polymodal.llm_core.layers.norm import DeferredNorm
from polymodal.llm_core.quantization import int4_pack
from polymodal.llm_core.quantization.base import QuantScheme

# Rows up to which CUDA calls take the INT4 GEMV (decode); more take the GEMM. Not yet
# measured on a GPU (docs/performance.md says what to sweep).
INT4_GEMV_MAX_ROWS = 4
# Rows from which CUDA calls dequantize the whole weight and call cuBLAS (the dequantization
# amortizes over the rows) instead of the GEMM. H200 at a 7B's shapes (docs/performance.md,
# fourteenth session): at 290 rows the dense path took 0.42-0.62x the GEMM's time, at 4096
# 0.50x; below ~128 rows the GEMM's 4-bit reads should win (not measured between 4 and 290).
INT4_DENSE_MIN_ROWS = 128


def int4_kernel(rows: int):
    """The CUDA kernel for `rows` rows of x: GEMV, GEMM or dequantize + cuBLAS (one signature:
    `(x, qweight, zeros, scales, group_size, perm, bias)`)."""
    from polymodal.llm_core.layers import int4_gemv, int4_kernels

    if rows <= INT4_GEMV_MAX_ROWS:
        return int4_gemv.int4_gemv
    if rows >= INT4_DENSE_MIN_ROWS:
        return int4_kernels.int4_matmul_dequantized
    return int4_kernels.int4_gemm


class Int4Scheme(QuantScheme):
    """AWQ or GPTQ checkpoint settings (4 bits, `group_size` input features a group)."""

    markers = ("qweight",)
    companions = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, fmt: str, group_size: int, desc_act=False, v2=False, sym=False, **kw):
        super().__init__(**kw)
        self.name, self.fmt = fmt, fmt
        self.group_size, self.desc_act, self.v2, self.sym = group_size, desc_act, v2, sym
        # a desc_act=False checkpoint's g_idx (if written) is the trivial one: not needed
        self.skipped = () if desc_act or fmt == "awq" else ("g_idx",)

    def linear_method(self, layer: Linear) -> LinearMethod:
        return Int4LinearMethod(self)

    def owns(self, suffix: str, tensor: torch.Tensor) -> bool:
        return suffix in self.companions

    def dequantize(self, tensors: dict, name: str) -> torch.Tensor:
        if self.fmt == "awq":
            q, zeros = int4_pack.unpack_awq(tensors["qweight"], tensors["qzeros"])
            return int4_pack.dequantize(q, zeros, tensors["scales"])
        q, zeros = int4_pack.unpack_gptq(tensors["qweight"], tensors["qzeros"], self.v2)
        g_idx = tensors.get("g_idx") if self.desc_act else None
        return int4_pack.dequantize(q, zeros, tensors["scales"], g_idx)

    def describe(self) -> str:
        order = ", desc_act" if self.desc_act else ""
        return f"{self.fmt} (int4, group {self.group_size}{order})"


def _bits(qc: dict, where: str, *keys) -> None:
    bits = next((qc[k] for k in keys if k in qc), 4)
    if bits != 4:
        raise ModelLoadError(f"{where}: {bits}-bit weights are not supported (4-bit only)")


def awq_scheme(qc: dict, where: str) -> Int4Scheme:
    """AutoAWQ's config.json block: {"quant_method": "awq", "bits"/"w_bit": 4, "group_size"/
    "q_group_size": 128, "zero_point": true, "version": "gemm", "modules_to_not_convert"}."""
    _bits(qc, where, "bits", "w_bit")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ModelLoadError(
            f"{where}: AWQ version {version!r} is not supported (the GEMM layout only)"
        )
    if not qc.get("zero_point", True):
        raise ModelLoadError(f"{where}: AWQ without zero points is not supported")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    ignore = qc.get("modules_to_not_convert") or ()
    return Int4Scheme("awq", group, online=bool(qc.get("online")), ignore=ignore)


def gptq_scheme(qc: dict, where: str) -> Int4Scheme:
    """GPTQ's config.json block: {"quant_method": "gptq", "bits": 4, "group_size": 128,
    "desc_act": false, "sym": true, "checkpoint_format": "gptq" | "gptq_v2"}."""
    _bits(qc, where, "bits")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported")
    group = int(qc.get("group_size", 128))
    return Int4Scheme(
        "gptq",
        group,
        desc_act=bool(qc.get("desc_act", False)),
        v2=fmt == "gptq_v2",
        sym=bool(qc.get("sym", True)),
        online=bool(qc.get("online")),
        ignore=qc.get("modules_to_not_convert") or (),
    )


def _param(shape, dtype, device, output_dim=None, pack_factor=1) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.output_dim, param.pack_factor = output_dim, pack_factor
    return param


class Int4LinearMethod(LinearMethod):
    """W4A16 for one `Linear`: the checkpoint's tensors in, one kernel layout out."""

    def __init__(self, scheme: Int4Scheme):
        self.scheme = scheme

    def group_size(self, layer: Linear) -> int:
        return layer.in_features if self.scheme.group_size <= 0 else self.scheme.group_size

    def create_weights(self, layer: Linear, dtype=None, device=None) -> None:
        k, n, g = layer.in_features, layer.out_features, self.group_size(layer)
        if k % 8 or n % 8 or k % g or g % 8:
            raise ValueError(
                f"INT4 ({self.scheme.fmt}) needs in/out features divisible by 8 and in "
                f"features by the group size {g}: got in={k}, out={n}"
            )
        groups = k // g
        if self.scheme.fmt == "awq":
            layer.qweight = _param((k, n // 8), torch.int32, device, 1, 8)
        else:
            layer.qweight = _param((k // 8, n), torch.int32, device, 1)
            if self.scheme.desc_act:
                layer.g_idx = _param((k,), torch.int32, device)
        layer.qzeros = _param((groups, n // 8), torch.int32, device, 1, 8)
        layer.scales = _param((groups, n), torch.float16, device, 1)
        layer.bias = None
        if layer.has_bias:
            layer.bias = _param((n,), dtype, device, 0)

    def randomize(self, layer: Linear) -> bool:
        """Random 4-bit codes, zero points 8 and scales near 0.02 / 4.6 (the weights' std
        near 0.02, as the loader's dummy init)."""
        layer.qweight.random_(-(2**31), 2**31 - 1)
        stored = 7 if self.scheme.fmt == "gptq" and not self.scheme.v2 else 8
        layer.qzeros.fill_(int.from_bytes(bytes([stored * 17] * 4), "little", signed=True))
        layer.scales.uniform_(0.003, 0.006)
        if getattr(layer, "g_idx", None) is not None:
            layer.g_idx.copy_(torch.arange(layer.in_features) // self.group_size(layer))
        if layer.bias is not None:
            layer.bias.zero_()
        return True

    @torch.no_grad()
    def process_weights(self, layer: Linear) -> None:
        scheme, g = self.scheme, self.group_size(layer)
        if scheme.fmt == "awq":
            q, zeros = int4_pack.unpack_awq(layer.qweight.data, layer.qzeros.data)
        else:
            q, zeros = int4_pack.unpack_gptq(layer.qweight.data, layer.qzeros.data, scheme.v2)
        perm = None
        g_idx = getattr(layer, "g_idx", None)
        if g_idx is not None:
            expected = torch.arange(layer.in_features, device=q.device) // g
            if not torch.equal(g_idx.data.long(), expected):
                perm = torch.argsort(g_idx.data.long(), stable=True)
                if not torch.equal(g_idx.data.long()[perm], expected):
                    raise ModelLoadError(
                        f"g_idx of a layer [{layer.out_features} x {layer.in_features}] does "
                        f"not put {g} input features in each group"
                    )
                q = q[perm]
                perm = perm.to(torch.int32)
            del layer.g_idx
        scales = layer.scales.data
        del layer.qweight, layer.qzeros, layer.scales
        layer.qweight = nn.Parameter(int4_pack.pack_k(q), requires_grad=False)  # [K/8, N]
        layer.zeros = nn.Parameter(zeros.to(torch.uint8), requires_grad=False)  # [G, N]
        layer.scales = nn.Parameter(scales, requires_grad=False)  # [G, N]
        layer.perm = None if perm is None else nn.Parameter(perm, requires_grad=False)

    def dequantized(self, layer: Linear) -> torch.Tensor:
        """The fp32 weight `[N, K]` (in x's feature order): the reference path."""
        q = int4_pack.unpack_k(layer.qweight)
        w = int4_pack.dequantize(q, layer.zeros, layer.scales)  # [N, K] in sorted order
        if layer.perm is not None:  # sorted column j multiplies x[:, perm[j]]
            w = torch.empty_like(w).index_copy_(1, layer.perm.long(), w)
        return w

    def apply(self, layer: Linear, x, silu_mul: bool = False, residual=None):
        # Not the GEMV's folds (int4_gemv takes a DeferredNorm, silu_mul and residual): with
        # them the 7B's INT4 decode ran 313 tokens/s against 396 without (H200, fourteenth
        # session); x's norm / activation is then recomputed by every feature block's threads.
        if isinstance(x, DeferredNorm):
            x = x.materialize()
        if silu_mul:
            x = silu_and_mul(x)
        if not x.is_cuda:
            return F.linear(x, self.dequantized(layer).to(x.dtype), layer.bias)
        rows = x.reshape(-1, x.shape[-1])
        kernel = int4_kernel(rows.shape[0])
        out = kernel(rows, layer.qweight, layer.zeros, layer.scales, self.group_size(layer),
                     layer.perm, layer.bias)  # fmt: skip
        return out.reshape(*x.shape[:-1], out.shape[-1])
