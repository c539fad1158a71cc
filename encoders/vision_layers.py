"""Building blocks shared by the Qwen-family vision towers.

Parameter names match transformers' module tree under `visual.` (`patch_embed.proj`,
`blocks.N.attn.qkv`, `merger.mlp.0`, ...), so a checkpoint's tensors load without renames.
Per-call attention state lives in `VisionAttentionMeta`, passed explicitly down the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.layers import fused_ops
from polymodal.llm_core.weights import run_post_load_hooks


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# hidden_act name in the HF config -> function (the subset vision towers use).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called `name` in an HF config; ModelLoadError if unknown."""
    if name not in ACTIVATIONS:
        raise ModelLoadError(
            f"vision config hidden_act={name!r} is not supported; choose from {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


@dataclass
class VisionAttentionMeta:
    """Segments for one attention pass over the packed patches of a batch of items.

    Attention never crosses a segment boundary: one segment per image/frame (full attention)
    or per window (Qwen2.5-VL window attention).
    """

    cu_seqlens: torch.Tensor  # int32 [num_segments + 1], on the patches' device
    max_seqlen: int  # host-side longest segment (kernel grid size)


def full_attention_meta(grid: list[list[int]], device: torch.device) -> VisionAttentionMeta:
    """One segment per frame: an item of grid (t, h, w) gives t segments of h * w patches."""
    seqlens = [h * w for t, h, w in grid for _ in range(t)]
    cu_seqlens = torch.tensor([0, *seqlens], dtype=torch.int64).cumsum(0).to(torch.int32)
    return VisionAttentionMeta(copy_to(cu_seqlens, device), max(seqlens))


def patch_coordinates(
    grid: list[list[int]], merge_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch, in the processor's merge-block-major patch order.

    Patches arrive grouped by `merge_size x merge_size` blocks: within a frame the flat index is
    `((block_row * blocks_per_row + block_col) * m + row_in_block) * m + col_in_block`.
    Returns two int64 tensors `[num_patches]` on `device`, computed on the host with tensor ops
    (no loop over patches) and copied asynchronously: the caller never waits for the device.
    """
    m = merge_size
    frame_sizes = torch.tensor([h * w for t, h, w in grid for _ in range(t)])
    blocks_per_row = torch.tensor([w // m for t, h, w in grid for _ in range(t)])
    total = sum(t * h * w for t, h, w in grid)
    frame_starts = frame_sizes.cumsum(0) - frame_sizes
    # [num_patches]: which frame each patch belongs to, then its index inside that frame
    frame_of = torch.repeat_interleave(torch.arange(len(frame_sizes)), frame_sizes)
    local = torch.arange(total) - frame_starts[frame_of]
    block, in_block = local // (m * m), local % (m * m)
    per_row = blocks_per_row[frame_of]
    rows = (block // per_row) * m + in_block // m
    cols = (block % per_row) * m + in_block % m
    return copy_to(rows, device), copy_to(cols, device)


def rotary_cos_sin(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary tables in fp32: cos, sin `[num_patches, head_dim]`.

    A quarter of the head dim's frequencies rotate by the row, the next quarter by the column;
    the half is repeated so `rotate_half` pairs dimension i with i + head_dim / 2 (HF layout).
    """
    half = head_dim // 2
    steps = torch.arange(0, half, 2, device=rows.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (steps / half))  # [head_dim / 4]
    # [num_patches, 2, head_dim / 4] -> [num_patches, head_dim / 2]
    angles = torch.stack([rows, cols], dim=-1).float()[..., None] * inv_freq
    angles = angles.flatten(1)
    angles = torch.cat([angles, angles], dim=-1)  # [num_patches, head_dim]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [num_patches, heads, head_dim]` in fp32 and cast back to its dtype.

    On CUDA a fused Triton kernel rotates `x` in place (same fp32 math, one rounding).
    """
    if cos.shape[-1] * 2 == x.shape[-1]:  # half tables from `fused_rotary_tables`
        return fused_ops().rotary_embedding(x, x[:0], cos, sin)[0]
    x_f = x.float()
    x1, x2 = x_f.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_f * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def fused_rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On CUDA, the half tables the fused Triton rotary takes (once per forward); else as is."""
    if cos.is_cuda and fused_ops() is not None:
        half = cos.shape[-1] // 2
        return cos[:, :half].contiguous(), sin[:, :half].contiguous()
    return cos, sin


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over each patch, run as one matmul over flattened patches.

    `proj.weight` keeps the Conv3d shape `[embed_dim, C, T, P, P]` so HF checkpoints load as is.
    """

    def __init__(self, in_channels: int, temporal_patch: int, patch: int, embed_dim: int) -> None:
        super().__init__()
        kernel = (temporal_patch, patch, patch)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # [embed_dim, C*T*P*P]
        return F.linear(pixel_values.to(weight.dtype), weight)  # [num_patches, embed_dim]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with 2D rotary, through an attention backend."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        meta: VisionAttentionMeta,
        backend,
    ) -> torch.Tensor:
        n = x.shape[0]
        # [num_patches, 3 * dim] -> 3 x [num_patches, heads, head_dim]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = backend.varlen_attention(
            q, k, v, meta.cu_seqlens, meta.max_seqlen, self.head_dim**-0.5, causal=False
        )
        return self.proj(out.reshape(n, -1))  # [num_patches, dim]


class PatchMerger(nn.Module):
    """Norm, then concatenate each `merge x merge` block of patches and project (MLP)."""

    def __init__(self, out_dim: int, context_dim: int, merge_size: int, norm: nn.Module) -> None:
        super().__init__()
        self.merged_dim = context_dim * merge_size**2
        self.ln_q = norm
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_patches, context_dim] -> [num_slots, merge^2 * context_dim] -> [num_slots, out_dim]
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


def make_uninitialized(module_factory: Callable[[], nn.Module], dtype, device) -> nn.Module:
    """Build a module on the meta device and allocate (uninitialized) storage on `device`.

    Skips random init, which is slow for large towers; `load_weights` fills every parameter.
    """
    with torch.device("meta"):
        module = module_factory()
    return module.to_empty(device=device).to(dtype)


def load_checked(module: nn.Module, named_tensors) -> None:
    """Copy `(name, tensor)` pairs into `module`'s parameters, checking names and shapes.

    Raises ModelLoadError naming every missing, unexpected or mis-shaped tensor; nothing is
    copied unless the whole set matches. Tensors are cast to each parameter's dtype.
    """
    items = dict(named_tensors.items() if hasattr(named_tensors, "items") else named_tensors)
    params = module.state_dict()
    missing = sorted(set(params) - set(items))
    unexpected = sorted(set(items) - set(params))
    mis_shaped = [
        f"{name}: checkpoint {tuple(items[name].shape)} vs model {tuple(p.shape)}"
        for name, p in params.items()
        if name in items and items[name].shape != p.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {'; '.join(mis_shaped)}")
    if problems:
        owner = type(module).__name__
        raise ModelLoadError(f"cannot load {owner} weights: " + " | ".join(problems))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(items[name])
    run_post_load_hooks(module)


_MISSING = object()


def config_value(cfg, *names: str, default=_MISSING):
    """First of `names` present in an HF config object or a plain dict (config.json's
    `vision_config`); `default` if none is, else ModelLoadError naming the field."""
    for name in names:
        value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise ModelLoadError(f"vision config lacks {' / '.join(names)}")
    return default


def rope_theta(cfg) -> float:
    """Vision rotary base: `rope_parameters.rope_theta` (transformers v5) or 10000."""
    params = config_value(cfg, "rope_parameters", default=None) or {}
    return float(params.get("rope_theta", 10000.0))
