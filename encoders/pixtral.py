"""Pixtral vision encoder (transformers' `PixtralVisionModel`) and the two projectors that read
it: Pixtral-12B's LLaVA form (`linear_1` / act / `linear_2`) and Mistral 3's (RMSNorm, a
learned `spatial_merge_size^2` patch merger, then the same two linears).

Images keep their own size (multiples of the patch): each is one attention segment, patches in
row-major order, with 2D rotary positions (row, column) whose frequencies alternate between
the two axes (`axial`: even frequencies rotate by the row, odd ones by the column). RMSNorms
(eps 1e-5) before attention and the SiLU-gated MLP; no biases. Names as HF's: `patch_conv`,
`ln_pre`, `transformer.layers.N.{attention_norm, attention.{q,k,v,o}_proj, ffn_norm,
feed_forward.{gate,up,down}_proj}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.llava import LlavaProjector, feature_layers
from polymodal.encoders.vision_layers import (
    VisionAttentionMeta,
    apply_rotary,
    get_activation,
    load_checked,
    make_uninitialized,
)
from polymodal.encoders.vit import segments, uniform_segments
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.layers.norm import RMSNorm


def axial_rotary(grids: list[tuple[int, int]], head_dim: int, theta: float, device):
    """cos, sin `[num_patches, head_dim]` (fp32) for row-major patch grids `(rows, cols)`,
    made on `device` (no host->device copy: a CUDA graph can capture the tower)."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.float, device=device)
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    arange = torch.arange(max(max(g) for g in grids), dtype=torch.float, device=device)
    rows = torch.cat([arange[:h].repeat_interleave(w) for h, w in grids])
    cols = torch.cat([arange[:w].repeat(h) for h, w in grids])
    # [N, head_dim / 4] each: even frequencies by the row, odd ones by the column
    angles = torch.cat([rows[:, None] * inv_freq[0::2], cols[:, None] * inv_freq[1::2]], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)  # [N, head_dim] (rotate-half layout)
    return angles.cos(), angles.sin()


class PixtralAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rotary, meta: VisionAttentionMeta, backend) -> torch.Tensor:
        n, shape = x.shape[0], (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = backend.varlen_attention(
            q, k, v, meta.cu_seqlens, meta.max_seqlen, self.head_dim**-0.5, causal=False
        )
        return self.o_proj(out.reshape(n, -1))


class PixtralMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=1e-5)
        self.attention = PixtralAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=1e-5)
        self.feed_forward = PixtralMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, rotary, meta, backend) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rotary, meta, backend)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PixtralLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PixtralVisionTower(nn.Module):
    """Images of any patch-multiple size -> hidden states of `feature_layers` (HF's
    `hidden_states[i]`: 0 after `ln_pre`, i after layer i), `[num_patches, dim * layers]`."""

    def __init__(self, cfg, backend) -> None:
        super().__init__()
        self.attn_backend = backend
        self.patch_size = cfg.patch_size
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.patch_conv = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.ln_pre = RMSNorm(cfg.hidden_size, eps=1e-5)
        self.transformer = PixtralTransformer(cfg)

    def forward(self, images: list[torch.Tensor], layers: list[int]):
        """`images`: `[C, H, W]` each -> (features `[patches, dim * len(layers)]`, grids)."""
        weight = self.patch_conv.weight
        patches, grids = [], []
        for image in images:  # [dim, H/p, W/p] -> [patches, dim], row-major
            grid = F.conv2d(image[None].to(weight.dtype), weight, stride=self.patch_size)[0]
            grids.append((grid.shape[1], grid.shape[2]))
            patches.append(grid.flatten(1).T)
        x = self.ln_pre(torch.cat(patches))
        lengths = [h * w for h, w in grids]
        # one image: offsets made on the device (what its CUDA graph captures)
        meta = (
            uniform_segments(1, lengths[0], x.device)
            if len(grids) == 1
            else segments(lengths, x.device)
        )
        rotary = axial_rotary(grids, self.head_dim, self.theta, x.device)
        wanted = [i if i >= 0 else self.num_layers + 1 + i for i in layers]
        states = {0: x}
        for index, layer in enumerate(self.transformer.layers[: max(wanted)], start=1):
            x = layer(x, rotary, meta, self.attn_backend)
            states[index] = x
        return torch.cat([states[i] for i in wanted], dim=-1), grids


class PixtralLlavaEncoder(nn.Module):
    """Pixtral-12B in transformers' LLaVA form: one row per patch, projected."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        backend = backend if backend is not None else TorchAttentionBackend()
        vision = hf_config.vision_config
        self.layers = feature_layers(hf_config)
        self.vision_tower = PixtralVisionTower(vision, backend)
        width = vision.hidden_size * len(self.layers)
        self.multi_modal_projector = LlavaProjector(hf_config, width)
        self.graphs = None  # EncoderGraphs of `features` once the decoder's are captured

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One image alone is replayed from a CUDA graph per image size once seen twice (eager,
        its 24 layers took ~26 ms of launches on an H200 for ~2 ms of kernels); several go
        through the tower together, eager."""
        images = self._images(items)
        if self.graphs is not None and len(images) == 1:
            return [self.graphs(images[0][None])]
        features, grids = self.vision_tower(images, self.layers)
        return list(self.project(features, grids).split(self.row_counts(grids)))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One image `[1, C, H, W]` -> its projected rows (what the CUDA graphs replay)."""
        return self.project(*self.vision_tower(list(pixel_values), self.layers))

    def project(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.multi_modal_projector(features)

    def row_counts(self, grids: list[tuple[int, int]]) -> list[int]:
        return [h * w for h, w in grids]

    @staticmethod
    def _images(items: list) -> list[torch.Tensor]:
        return [it.data["pixel_values"][0] for it in items]  # [1, C, H, W] each


class Mistral3Projector(nn.Module):
    """RMSNorm, merge each `m x m` block of patches (HF's `Mistral3PatchMerger`: an unfold,
    then one linear), linear_1 -> act -> linear_2."""

    def __init__(self, hf_config) -> None:
        super().__init__()
        vision, text = hf_config.vision_config, hf_config.get_text_config()
        self.merge = hf_config.spatial_merge_size
        width = vision.hidden_size * len(feature_layers(hf_config))
        self.norm = RMSNorm(vision.hidden_size, eps=text.rms_norm_eps)
        self.patch_merger = nn.Module()
        self.patch_merger.merging_layer = nn.Linear(
            vision.hidden_size * self.merge**2, vision.hidden_size, bias=False
        )
        bias = hf_config.multimodal_projector_bias
        self.linear_1 = nn.Linear(width, text.hidden_size, bias=bias)
        self.act = get_activation(hf_config.projector_hidden_act)
        self.linear_2 = nn.Linear(text.hidden_size, text.hidden_size, bias=bias)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        features = self.norm(features)
        merged, dim, m = [], features.shape[-1], self.merge
        for tokens, (h, w) in zip(features.split([h * w for h, w in grids]), grids):
            # [h * w, dim] -> [1, dim, h, w] -> unfold -> [h/m * w/m, dim * m * m]
            grid = tokens.view(h, w, dim).permute(2, 0, 1)[None]
            merged.append(F.unfold(grid, kernel_size=m, stride=m).view(dim * m * m, -1).T)
        x = self.patch_merger.merging_layer(torch.cat(merged))
        return self.linear_2(self.act(self.linear_1(x)))


class Mistral3Encoder(PixtralLlavaEncoder):
    """Mistral 3: Pixtral tower, then the merging projector: one row per `m x m` patches."""

    def __init__(self, hf_config, backend=None) -> None:
        nn.Module.__init__(self)
        backend = backend if backend is not None else TorchAttentionBackend()
        self.layers = feature_layers(hf_config)
        self.merge = hf_config.spatial_merge_size
        self.vision_tower = PixtralVisionTower(hf_config.vision_config, backend)
        self.multi_modal_projector = Mistral3Projector(hf_config)
        self.graphs = None

    def project(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.multi_modal_projector(features, grids)

    def row_counts(self, grids: list[tuple[int, int]]) -> list[int]:
        return [(h // self.merge) * (w // self.merge) for h, w in grids]
