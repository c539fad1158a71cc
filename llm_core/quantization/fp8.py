"""FP8 linears: E4M3 weights with per-tensor, per-channel or 128x128 block scales;
activations quantized per token (per 128-feature group for block weights) as they run (W8A8),
but for one 16-bit row on CUDA with per-tensor / per-channel scales (batch-1 decode): the
16-bit GEMV streams the E4M3 weights with x as it is (W8A16, `gemv.gemv(w_scale=)`, every fold
of the 16-bit decode), nearer the dequantized weights than W8A8.

Checkpoint formats (config.json `quantization_config`):
  fp8 (online)        `quantization="fp8"` on a 16-bit checkpoint: per-channel scales computed
                      on load (the 16-bit weight is freed after)
  fp8                 DeepSeek-V3 / Qwen3 FP8: `weight_block_size: [128, 128]`, tensors
                      `weight` (E4M3) + `weight_scale_inv` [N/128, K/128]; without a block size
                      (vLLM's own): per-tensor `weight_scale`
  compressed-tensors  llm-compressor's `float-quantized`: `weight` + `weight_scale` ([N, 1]
                      channel, [1] tensor, [N/128, K/128] block); `ignore` keeps modules 16-bit
  modelopt            ModelOpt FP8: `weight` + per-tensor `weight_scale`; `exclude_modules`
Per-tensor scales are kept per output channel (the same numbers), so q/k/v and gate/up fuse
whatever their shards' scales. Static `input_scale`s are not used: activations are always
scaled dynamically (at least as accurate; noted in docs/quantization.md).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.linear import Linear, LinearMethod
from polymodal.llm_core.layers.norm import DeferredNorm
from polymodal.llm_core.quantization import fp8_ops
from polymodal.llm_core.quantization.base import QuantScheme

# Rows up to which CUDA calls take the FP8 GEMV (batch-1 decode, as the 16-bit GEMV).
FP8_GEMV_MAX_ROWS = 1
# that row with per-channel / per-tensor scales through the 16-bit GEMV (W8A16); False: the
# E4M3 wgmma GEMV (W8A8; `scripts/device/fp8_ab.py` times both)
ONE_ROW_W8A16 = True
# Rows (decode batches) up to which per-channel W8A8 takes the Triton GEMM (narrow tiles up to
# `fp8_kernels.NARROW_MAX_ROWS`), not cuBLAS: its FP8 kernel tiles N by 128 (28 CTAs for a
# 3584-wide output), qkv / o / down at 1.0-1.2 TB/s (H100, 32 rows, a 7B's layer: 110 vs
# 150 us, bf16 170, `scripts/bench_quant_kernels.py --only fp8_rows`; captioning 32 / 64
# images 8% / 10% faster, `scripts/device/fp8_quant_ab.py`). 0: cuBLAS from 2 rows.
TRITON_MAX_ROWS = 64


class Fp8Scheme(QuantScheme):
    """FP8 weights: `strategy` "tensor" / "channel" / "block"; `scale_name` the checkpoint's
    scale tensor suffix (`weight_scale`, or `weight_scale_inv` for DeepSeek-style blocks)."""

    needs_fp8 = True
    skipped = ("input_scale",)

    def __init__(self, name: str, strategy: str, scale_name: str = "weight_scale", **kw):
        super().__init__(**kw)
        self.name, self.strategy, self.scale_name = name, strategy, scale_name
        self.markers = (scale_name,)
        self.block = fp8_ops.BLOCK if strategy == "block" else None

    def linear_method(self, layer: Linear) -> LinearMethod:
        return Fp8LinearMethod(self)

    def owns(self, suffix: str, tensor: torch.Tensor) -> bool:
        return suffix == self.scale_name or (suffix == "weight" and tensor.dtype == fp8_ops.FP8)

    def dequantize(self, tensors: dict, name: str) -> torch.Tensor:
        scale = tensors[self.scale_name]
        return fp8_ops.dequantize_weight(tensors["weight"], scale, self.block)

    def describe(self) -> str:
        how = "quantized on load" if self.online else "checkpoint"
        return f"{self.name} (fp8 e4m3, {self.strategy} scales, {how})"


def fp8_scheme(qc: dict, where: str) -> Fp8Scheme:
    """`quant_method: fp8`: online, or a checkpoint with `weight_block_size` (DeepSeek/Qwen3
    `weight_scale_inv`) or per-tensor `weight_scale`."""
    if qc.get("online"):
        return Fp8Scheme("fp8", "channel", online=True)
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise ModelLoadError(f"{where}: FP8 format {fmt!r} is not supported (e4m3 only)")
    block = qc.get("weight_block_size")
    ignore = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()
    if block is not None:
        if list(block) != [fp8_ops.BLOCK, fp8_ops.BLOCK]:
            raise ModelLoadError(f"{where}: FP8 weight_block_size {block} (128x128 only)")
        return Fp8Scheme("fp8", "block", "weight_scale_inv", ignore=ignore)
    return Fp8Scheme("fp8", "tensor", ignore=ignore)


def compressed_tensors_scheme(qc: dict, where: str) -> Fp8Scheme:
    """llm-compressor's FP8 (`format: float-quantized`, 8-bit float weights)."""
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    if fmt != "float-quantized" or len(groups) != 1:
        raise ModelLoadError(
            f"{where}: compressed-tensors format {fmt!r} with {len(groups)} config group(s) is "
            "not supported; polymodal runs one 'float-quantized' (FP8) group"
        )
    weights = groups[0].get("weights") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ModelLoadError(f"{where}: compressed-tensors weights {weights} (FP8 only)")
    strategy = weights.get("strategy", "tensor")
    if strategy == "block" and list(weights.get("block_structure") or []) != [128, 128]:
        raise ModelLoadError(f"{where}: block_structure {weights.get('block_structure')}")
    if strategy not in ("tensor", "channel", "block"):
        raise ModelLoadError(f"{where}: FP8 weight strategy {strategy!r} is not supported")
    return Fp8Scheme("compressed-tensors", strategy, ignore=qc.get("ignore") or ())


def modelopt_scheme(qc: dict, where: str) -> Fp8Scheme:
    """NVIDIA ModelOpt's export: `quant_algo: FP8` (flat, or nested under `quantization`)."""
    inner = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
    algo = str(inner.get("quant_algo", "")).upper()
    if algo != "FP8":
        raise ModelLoadError(f"{where}: ModelOpt quant_algo {algo!r} is not supported (FP8)")
    return Fp8Scheme("modelopt", "tensor", ignore=inner.get("exclude_modules") or ())


def _param(shape, dtype, device, output_dim=0, pack_factor=1, broadcast=False):
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.output_dim, param.pack_factor, param.broadcast = output_dim, pack_factor, broadcast
    return param


class Fp8LinearMethod(LinearMethod):
    """W8A8 FP8 for one `Linear` (see the module docstring)."""

    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme

    def create_weights(self, layer: Linear, dtype=None, device=None) -> None:
        n, k, scheme = layer.out_features, layer.in_features, self.scheme
        if scheme.online:  # the 16-bit checkpoint's weight; quantized in process_weights
            layer.weight = _param((n, k), dtype, device)
        else:
            layer.weight = _param((n, k), fp8_ops.FP8, device)
        layer.bias = _param((n,), dtype, device) if layer.has_bias else None
        if scheme.online:
            return  # the scales come with the quantization (process_weights)
        if scheme.strategy == "block":
            block = fp8_ops.BLOCK
            shards = getattr(layer, "shard_offsets", None) or {}
            if k % block or any(s % block or z % block for s, z in shards.values()):
                raise ValueError(
                    f"block FP8 needs in features and each fused shard's out features "
                    f"divisible by {block}: in={k}, shards={shards}"
                )
            scale = _param((-(-n // block), k // block), torch.float32, device, 0, block)
        else:
            scale = _param((n, 1), torch.float32, device, broadcast=True)
        setattr(layer, scheme.scale_name, scale)

    def randomize(self, layer: Linear) -> bool:
        if self.scheme.online:  # 16-bit weights: the default init, quantized after
            return False
        weight = torch.randn(layer.weight.shape, device=layer.weight.device) * 0.02
        w, scale = fp8_ops.quantize_weight(weight, self.scheme.strategy)
        layer.weight.copy_(w)
        getattr(layer, self.scheme.scale_name).copy_(scale.reshape(-1, scale.shape[-1]))
        if layer.bias is not None:
            layer.bias.zero_()
        return True

    @torch.no_grad()
    def process_weights(self, layer: Linear) -> None:
        if self.scheme.online:
            weight, scale = fp8_ops.quantize_weight(layer.weight.data, "channel")
            del layer.weight
            layer.weight = nn.Parameter(weight, requires_grad=False)
            setattr(layer, self.scheme.scale_name, nn.Parameter(scale, requires_grad=False))
        layer.weight_scale_fp32 = getattr(layer, self.scheme.scale_name).data.float()

    def dequantized(self, layer: Linear) -> torch.Tensor:
        """The fp32 weight `[N, K]`."""
        return fp8_ops.dequantize_weight(layer.weight, layer.weight_scale_fp32, self.scheme.block)

    def apply(self, layer: Linear, x, silu_mul: bool = False, residual=None):
        rows_in = x.h if isinstance(x, DeferredNorm) else x
        if rows_in.is_cuda and rows_in.dim() == 2 and rows_in.shape[0] == FP8_GEMV_MAX_ROWS == 1:
            # the GEMV folds the deferred norm, SiLU*mul and the residual add, as the 16-bit one
            from polymodal.llm_core.layers import fp8_gemv, gemv

            if self.scheme.block is None and ONE_ROW_W8A16:
                return gemv.gemv(x, layer.weight, layer.bias, silu_mul=silu_mul,
                                 residual=residual, w_scale=layer.weight_scale_fp32)  # fmt: skip
            return fp8_gemv.fp8_gemv(x, layer.weight, layer.weight_scale_fp32, self.scheme.block,
                                     layer.bias, silu_mul=silu_mul, residual=residual)  # fmt: skip
        if isinstance(x, DeferredNorm):
            x = x.materialize()
        if silu_mul:
            x = silu_and_mul(x)
        block, scale = self.scheme.block, layer.weight_scale_fp32
        if not x.is_cuda:
            return fp8_ops.w8a8_reference(x, layer.weight, scale, block, layer.bias)
        from polymodal.llm_core.layers import fp8_gemv, fp8_kernels

        rows = x.reshape(-1, x.shape[-1])
        n, k = layer.weight.shape
        if rows.shape[0] <= FP8_GEMV_MAX_ROWS:
            out = fp8_gemv.fp8_gemv(rows, layer.weight, scale, block, layer.bias)
        elif (
            block is None
            and rows.shape[0] > TRITON_MAX_ROWS
            and n % 16 == 0
            and k % 16 == 0
            and x.dtype != torch.float32
        ):
            out = _scaled_mm(rows, layer.weight, scale, layer.bias)
        else:
            out = fp8_kernels.fp8_gemm(rows, layer.weight, scale, block, layer.bias)
        return out.reshape(*x.shape[:-1], n)


def _scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias):
    """cuBLAS FP8 GEMM with a scale per row of x (per token) and per output channel."""
    from polymodal.llm_core.layers.fp8_kernels import quantize_rows

    xq, xs = quantize_rows(x)  # [M, K] fp8, [M, 1]
    out = torch._scaled_mm(
        xq,
        weight.t(),  # [K, N] column-major
        scale_a=xs,
        scale_b=scale.reshape(1, -1),
        out_dtype=torch.bfloat16,  # row-wise scaling writes bf16
        bias=None if bias is None else bias.to(torch.bfloat16),
    )
    return out.to(x.dtype)
