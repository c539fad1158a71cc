"""Qwen2.5-VL vision tower: RMSNorm, SwiGLU MLP, window attention with a few full-attention blocks.

Window attention: the merged-patch grid of each frame is cut into windows of
`window_size // patch_size // merge` merged patches a side (partial at the right/bottom edges).
Patches are permuted once so every window is contiguous, all blocks run in that order (full
attention blocks see whole frames, which stay contiguous), and the merger output is permuted
back. Module tree and parameter names equal transformers' `visual.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vision_layers import (
    PatchEmbed,
    PatchMerger,
    VisionAttention,
    VisionAttentionMeta,
    config_value,
    full_attention_meta,
    fused_rotary_tables,
    get_activation,
    load_checked,
    make_uninitialized,
    patch_coordinates,
    rope_theta,
    rotary_cos_sin,
)
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.layers import fused_ops
from polymodal.llm_core.layers.norm import RMSNorm


@dataclass(frozen=True)
class Qwen2_5VisionConfig:
    """The fields of HF `Qwen2_5_VLVisionConfig` the tower needs."""

    depth: int
    hidden_size: int  # width of the ViT blocks
    out_hidden_size: int  # merger output = the decoder's hidden size
    intermediate_size: int
    num_heads: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int  # window side in pixels
    fullatt_block_indexes: tuple[int, ...]
    rope_theta: float

    @classmethod
    def from_hf(cls, cfg) -> Qwen2_5VisionConfig:
        """Parse an HF vision config object or config.json's `vision_config` dict."""
        return cls(
            depth=int(config_value(cfg, "depth")),
            hidden_size=int(config_value(cfg, "hidden_size")),
            out_hidden_size=int(config_value(cfg, "out_hidden_size")),
            intermediate_size=int(config_value(cfg, "intermediate_size")),
            num_heads=int(config_value(cfg, "num_heads", "num_attention_heads")),
            hidden_act=config_value(cfg, "hidden_act", default="silu"),
            in_channels=int(config_value(cfg, "in_channels", "in_chans", default=3)),
            patch_size=int(config_value(cfg, "patch_size", default=14)),
            temporal_patch_size=int(config_value(cfg, "temporal_patch_size", default=2)),
            spatial_merge_size=int(config_value(cfg, "spatial_merge_size", default=2)),
            window_size=int(config_value(cfg, "window_size")),
            fullatt_block_indexes=tuple(config_value(cfg, "fullatt_block_indexes")),
            rope_theta=rope_theta(cfg),
        )


def window_partition(
    grid: list[list[int]], merge_size: int, window: int, device: torch.device
) -> tuple[torch.Tensor, VisionAttentionMeta]:
    """Order of merged patches that makes each window contiguous, and the windows' segments.

    `window` is the window side in merged patches. Returns `window_index` int64
    `[num_merged]` (position i of the windowed order holds merged patch `window_index[i]`) and
    the window-attention metadata, counted in patches (`merge^2` per merged patch). Computed on
    the host and copied to `device` asynchronously: the caller never waits for the device.
    """
    unit = merge_size**2
    # Per frame: merged grid (mh, mw), windows per row/column, first window id.
    frames = [(h // merge_size, w // merge_size) for t, h, w in grid for _ in range(t)]
    win_rows = [-(-mh // window) for mh, _ in frames]
    win_cols = [-(-mw // window) for _, mw in frames]
    win_counts = [r * c for r, c in zip(win_rows, win_cols, strict=True)]
    sizes = torch.tensor([mh * mw for mh, mw in frames])
    widths = torch.tensor([mw for _, mw in frames])
    cols_per_frame = torch.tensor(win_cols)
    first_window = torch.tensor([0, *win_counts[:-1]]).cumsum(0)
    total = sum(mh * mw for mh, mw in frames)
    # [num_merged]: frame of each merged patch, then its (row, col) on the merged grid
    frame_of = torch.repeat_interleave(torch.arange(len(frames)), sizes)
    local = torch.arange(total) - (sizes.cumsum(0) - sizes)[frame_of]
    row, col = local // widths[frame_of], local % widths[frame_of]
    window_id = (
        first_window[frame_of]
        + (row // window) * cols_per_frame[frame_of]
        + torch.div(col, window, rounding_mode="floor")
    )
    # Stable sort keeps row-major order inside each window, as HF's padded reshape does.
    window_index = torch.sort(window_id, stable=True).indices
    counts = torch.bincount(window_id, minlength=sum(win_counts)) * unit
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    # Largest window: a full one, or the whole frame when it is smaller than a window.
    max_seqlen = max(min(mh, window) * min(mw, window) for mh, mw in frames) * unit
    meta = VisionAttentionMeta(copy_to(cu_seqlens, device), max_seqlen)
    return copy_to(window_index, device), meta


class Qwen2_5VisionMLP(nn.Module):
    """SwiGLU: down_proj(act(gate_proj(x)) * up_proj(x)), with biases."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self, "_fused", None)
        if fused is not None and x.is_cuda:
            gate_up_w, gate_up_b, down_w = fused
            h = fused_ops().silu_and_mul(F.linear(x, gate_up_w, gate_up_b))
            return F.linear(h, down_w, self.down_proj.bias)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def post_load(self) -> None:
        """After loading, on CUDA: gate|up stacked, hidden dims padded to a multiple of 64.

        Qwen2.5-VL's hidden 3420 leaves rows 8-byte aligned, which sends cuBLAS to slow
        align-2 kernels; zero padding is exact (silu(0) * 0 = 0 meets zero down_proj columns).
        A later load (`LLM.load_weights`) writes the same tensors: captured tower graphs see it.
        """
        if not (self.gate_proj.weight.is_cuda and self.act is F.silu and fused_ops()):
            self._fused = None
            return
        pad = -self.gate_proj.out_features % 64
        gate_up = torch.cat([F.pad(self.gate_proj.weight, (0, 0, 0, pad)),
                             F.pad(self.up_proj.weight, (0, 0, 0, pad))])  # fmt: skip
        bias = torch.cat([F.pad(self.gate_proj.bias, (0, pad)), F.pad(self.up_proj.bias, (0, pad))])
        fused = (gate_up, bias, F.pad(self.down_proj.weight, (0, pad)).contiguous())
        if getattr(self, "_fused", None) is None:
            self._fused = fused
            return
        for old, new in zip(self._fused, fused):
            old.copy_(new)


class Qwen2_5VisionBlock(nn.Module):
    """Pre-RMSNorm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    The residual stream is threaded through, as in the decoder: a block returns its MLP output
    and the running residual, and the next norm adds them (one fused kernel on CUDA).
    """

    def __init__(self, cfg: Qwen2_5VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Qwen2_5VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, residual, rotary, meta: VisionAttentionMeta, backend):
        """-> (mlp output, residual); `residual` is None for the first block."""
        if residual is None:
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1(x, residual)
        h, residual = self.norm2(self.attn(h, rotary, meta, backend), residual)
        return self.mlp(h), residual


class Qwen2_5VisionTower(nn.Module):
    """Qwen2.5-VL vision encoder: `(pixel_values, grid_thw) -> [num_slots, out_hidden_size]`.

    `backend` is any attention backend with `varlen_attention` (default: torch reference).
    """

    supports_cuda_graphs = True  # grid-derived tensors come from the `_layouts` cache
    # Each temporal patch (frame pair) of a video is computed alone: windows are cut per
    # temporal patch and the window order never moves a patch out of its own (`window_partition`),
    # full-attention blocks attend within one temporal patch (`full_attention_meta`), the rotary
    # angles depend on a patch's row and column only. So a video's rows equal those of its
    # temporal patches encoded apart (the engine's `split_media` relies on it).
    frames_attend_alone = True

    def __init__(self, cfg: Qwen2_5VisionConfig, backend=None) -> None:
        super().__init__()
        self.config = cfg
        self.spatial_merge_size = cfg.spatial_merge_size
        self.out_hidden_size = cfg.out_hidden_size
        self.attn_backend = backend if backend is not None else TorchAttentionBackend()
        self._layouts: dict = {}  # grid list -> (window index, metas, rotary tables)
        self.patch_embed = PatchEmbed(
            cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size
        )
        self.blocks = nn.ModuleList(Qwen2_5VisionBlock(cfg) for _ in range(cfg.depth))
        norm = RMSNorm(cfg.hidden_size, eps=1e-6)
        merge = cfg.spatial_merge_size
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, merge, norm)

    @classmethod
    def from_config(
        cls, hf_vision_config, dtype=torch.float32, device="cpu", backend=None
    ) -> Qwen2_5VisionTower:
        """Build the tower from an HF vision config; parameters stay uninitialized until
        `load_weights`."""
        cfg = Qwen2_5VisionConfig.from_hf(hf_vision_config)
        return make_uninitialized(lambda: cls(cfg, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        """Load `(name, tensor)` pairs named as under `visual.` (prefix stripped).

        Raises ModelLoadError on missing, unexpected or mis-shaped tensors.
        """
        load_checked(self, named_tensors)

    def _layout(self, grid: list[list[int]], device: torch.device):
        """Window order, attention segments and rotary tables of a grid list, cached: they
        depend on the grids alone, and batches of same-sized media repeat them."""
        key = (str(device), tuple(map(tuple, grid)))
        cache = self._layouts
        if key not in cache:
            cfg, unit = self.config, self.spatial_merge_size**2
            window = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
            index, window_meta = window_partition(grid, cfg.spatial_merge_size, window, device)
            rows, cols = patch_coordinates(grid, self.spatial_merge_size, device)
            cos, sin = rotary_cos_sin(rows, cols, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
            cos, sin = (t.view(-1, unit, t.shape[-1])[index].flatten(0, 1) for t in (cos, sin))
            if len(cache) >= 64:
                cache.pop(next(iter(cache)))
            full_meta = full_attention_meta(grid, device)
            cache[key] = (index, window_meta, full_meta, fused_rotary_tables(cos, sin))
        return cache[key]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values `[num_patches, C*T*P*P]`, grid_thw int `[num_items, 3]` (t, h, w in
        patches) -> embeddings `[num_patches / merge^2, out_hidden_size]` in item order."""
        grid = grid_thw.tolist()
        window_index, window_meta, full_meta, rotary = self._layout(grid, pixel_values.device)
        unit = self.spatial_merge_size**2
        # [num_patches, C*T*P*P] -> [num_patches, hidden]; merged patches in window order
        x = self.patch_embed(pixel_values)
        x = x.view(-1, unit, x.shape[-1])[window_index].flatten(0, 1)
        cfg, residual = self.config, None
        for i, block in enumerate(self.blocks):
            meta = full_meta if i in cfg.fullatt_block_indexes else window_meta
            x, residual = block(x, residual, rotary, meta, self.attn_backend)
        merged = self.merger(x + residual)  # [num_slots, out_hidden_size], in window order
        out = torch.empty_like(merged)
        out[window_index] = merged  # back to item order
        return out
