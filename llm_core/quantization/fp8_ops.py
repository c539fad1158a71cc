"""FP8 (E4M3) quantize / dequantize in plain torch: the reference the kernels are held to,
the CPU path, online quantization of 16-bit weights and the checkpoint writers of the tests.

Scales are multipliers back to real values (`real = fp8 * scale`), fp32, as every format
here stores them (DeepSeek's `weight_scale_inv` too, despite its name). Quantizing divides by
the scale, clamps to +-448 (E4M3's largest finite value; torch's cast does not saturate) and
rounds to nearest in the cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row or block quantizes to zeros with this scale
BLOCK = 128  # block-wise weights: 128 x 128 tiles; their activations: groups of 128 features


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` clamped to E4M3's range and cast (round to nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_per_token(x: torch.Tensor, group: int | None = None):
    """Dynamic activation quantization: one scale per row `[M, 1]`, or per row and `group`
    consecutive features `[M, K / group]` (block-wise weights). Returns (fp8 x, fp32 scales)."""
    m, k = x.shape
    xf = x.float()
    if group is None:
        scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
        return to_fp8(xf, scale), scale
    groups = xf.reshape(m, k // group, group)
    scale = (groups.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8(groups, scale).reshape(m, k), scale.squeeze(-1)


def quantize_weight(weight: torch.Tensor, strategy: str = "channel", block: int = BLOCK):
    """FP8 weight `[N, K]` and its scales: "tensor" `[1]`, "channel" `[N, 1]`, "block"
    `[ceil(N / block), ceil(K / block)]` (what llm-compressor and DeepSeek write)."""
    w = weight.float()
    if strategy == "tensor":
        scale = (w.abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1)
        return to_fp8(w, scale), scale
    if strategy == "channel":
        scale = (w.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
        return to_fp8(w, scale), scale
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = F.pad(w, (0, kb * block - k, 0, nb * block - n))
    tiles = padded.reshape(nb, block, kb, block).abs().amax(dim=(1, 3))
    scale = (tiles / FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8(w, expand_block_scale(scale, n, k, block)), scale


def expand_block_scale(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """`[ceil(N/b), ceil(K/b)]` block scales -> one per weight `[N, K]`."""
    return scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, block: int | None = None):
    """fp32 `[N, K]` from an FP8 weight and its tensor / channel (`[N, 1]`) / block scales."""
    n, k = weight.shape
    if block is not None:
        return weight.float() * expand_block_scale(scale.float(), n, k, block)
    return (
        weight.float() * scale.float().reshape(-1, 1)
        if scale.numel() > 1
        else (weight.float() * scale.float().reshape(()))
    )


def w8a8_reference(x, weight, scale, block: int | None = None, bias=None) -> torch.Tensor:
    """What the FP8 kernels compute, in fp32: x quantized per token (per 128-feature group
    for block weights), both dequantized, multiplied; the output in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token(rows, block)
    if block is not None:
        xs = xs.repeat_interleave(block, 1)[:, : rows.shape[1]]
    out = F.linear(xq.float() * xs, dequantize_weight(weight, scale, block))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)
