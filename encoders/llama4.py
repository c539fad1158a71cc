"""Llama 4's image encoder (transformers' `Llama4VisionModel` + `Llama4MultiModalProjector`).

Per tile: patches by unfold + a linear (no bias), a class token appended last, learned
positions, LayerNorm, pre-norm layers (biased q/k/v/o, 2D rotary on interleaved pairs: the
first half of the pairs turns with the patch's column, the second with its row, the class
token not at all; GELU MLP), LayerNorm; the class token dropped, a pixel shuffle (2x2 patches
into one at `pixel_shuffle_ratio` 0.5), a two-layer GELU MLP, and the projector's linear into
the decoder's width. A tile is one attention segment.

Names as HF's: `vision_model.{patch_embedding.linear, class_embedding,
positional_embedding_vlm, layernorm_pre, layernorm_post, model.layers.N.{self_attn.*, mlp.*,
input_layernorm, post_attention_layernorm}, vision_adapter.mlp.fc1/fc2}`,
`multi_modal_projector.linear_1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vision_layers import load_checked, make_uninitialized
from polymodal.encoders.vit import PackedQKV, uniform_segments
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.layers import fused_ops
from polymodal.llm_core.layers.norm import add_layer_norm


def tile_rotary(side: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[side^2 + 1, head_dim / 2]` per interleaved pair (patches row-major, then the
    class token, which is not rotated)."""
    half = head_dim // 2
    freq = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    index = torch.arange(side * side)
    cols, rows = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat([cols[:, None] * freq, rows[:, None] * freq], dim=-1)  # [side^2, half]
    angles = torch.cat([angles, angles.new_zeros(1, half)])  # the class token: angle 0
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of `x [n, heads, head_dim]` by per-row angles `[n, head_dim/2]`
    in fp32 (HF's complex multiply), back in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [n, heads, head_dim / 2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class Llama4VisionAttention(PackedQKV):
    """Bidirectional attention within each tile; biased q/k/v/o (q/k/v one GEMM once loaded),
    q and k rotated per pair: on CUDA in place by one Triton launch (fp32 math, one rounding,
    as `rotate_pairs`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x, rotary, meta, backend) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        if q.is_cuda and fused_ops() is not None:
            fused_ops().rotary_embedding(q, k, *rotary, pairs=True)
        else:
            q, k = rotate_pairs(q, *rotary), rotate_pairs(k, *rotary)
        out = backend.varlen_attention(
            q, k, v, meta.cu_seqlens, meta.max_seqlen, self.head_dim**-0.5, causal=False
        )
        return self.o_proj(out.reshape(x.shape[0], -1))


class Llama4VisionMLP(nn.Module):
    """fc1 -> GELU (exact) -> fc2, both biased."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Llama4VisionLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.self_attn = Llama4VisionAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.mlp = Llama4VisionMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x, rotary, meta, backend) -> torch.Tensor:
        x, mlp = self.run(x, None, rotary, meta, backend)
        return x + mlp

    def run(self, x, delta, rotary, meta, backend):
        """The layer over the stream `x + delta` (`x` when `delta` is None), each residual add
        inside the LayerNorm after it: returns the stream before the MLP's add and the MLP's
        output."""
        x, h = add_layer_norm(self.input_layernorm, x, delta)
        attn = self.self_attn(h, rotary, meta, backend)
        x, h = add_layer_norm(self.post_attention_layernorm, x, attn)
        return x, self.mlp(h)


class Llama4PixelShuffleMLP(nn.Module):
    """Pixel shuffle (`ratio` 0.5: 2x2 neighbours into one token, 4x the width), then
    fc1 -> GELU -> fc2 -> GELU (HF's `Llama4VisionPixelShuffleMLP`; no biases)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.mlp.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count, num_patches, dim = x.shape
        side, r = int(num_patches**0.5), self.ratio
        # HF's `pixel_shuffle`: [N, h, w, c] -> [N, h, w*r, c/r] -> transpose -> merge -> back
        x = x.view(count, side, int(side * r), int(dim / r)).permute(0, 2, 1, 3)
        x = x.reshape(count, int(side * r), int(side * r), int(dim / r**2)).permute(0, 2, 1, 3)
        x = x.reshape(count, -1, x.shape[-1])
        return F.gelu(self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class Llama4VisionModel(nn.Module):
    """transformers' `Llama4VisionModel` (names under `vision_model.`): tiles -> shuffled,
    adapted patch features."""

    def __init__(self, cfg, backend) -> None:
        super().__init__()
        self.attn_backend = backend
        self.side = cfg.image_size // cfg.patch_size
        self.patch_size = cfg.patch_size
        self.rope_theta = float(cfg.rope_parameters["rope_theta"])
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.patch_embedding = nn.Module()
        self.patch_embedding.linear = nn.Linear(
            cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(self.side**2 + 1, cfg.hidden_size))
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            Llama4VisionLayer(cfg) for _ in range(cfg.num_hidden_layers)
        )
        self.vision_adapter = Llama4PixelShuffleMLP(cfg)
        self._rotary_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rotary(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One tile's cos, sin `[tokens, head_dim / 2]` on `device`, made once per device."""
        tables = self._rotary_tables.get(device)
        if tables is None:
            cos, sin = tile_rotary(self.side, self.head_dim, self.rope_theta)
            tables = self._rotary_tables[device] = (copy_to(cos, device), copy_to(sin, device))
        return tables

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """`[N, C, S, S]` tiles -> `[N, tokens_per_tile, projector_output_dim]`."""
        count = tiles.shape[0]
        weight = self.patch_embedding.linear.weight
        # [N, C * p * p, patches] -> [N, patches, dim], then the class token last
        x = F.unfold(tiles.to(weight.dtype), self.patch_size, stride=self.patch_size)
        x = self.patch_embedding.linear(x.transpose(1, 2))
        cls = self.class_embedding.expand(count, 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm
        x = self.layernorm_pre(x)
        tokens = x.shape[1]
        x = x.flatten(0, 1)  # [N * tokens, dim]: one attention segment a tile
        meta = uniform_segments(count, tokens, x.device)
        rotary = tuple(t.repeat(count, 1) for t in self._rotary(x.device))  # [N * tokens, d/2]
        delta = None  # the last layer's MLP output, added inside the next LayerNorm
        for layer in self.model.layers:
            x, delta = layer.run(x, delta, rotary, meta, self.attn_backend)
        x = add_layer_norm(self.layernorm_post, x, delta, keep_sum=False)[1]
        return self.vision_adapter(x.view(count, tokens, -1)[:, :-1])


class Llama4VisionEncoder(nn.Module):
    """Tiles of every item -> `tokens_per_tile` rows each, in the decoder's width."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        backend = backend if backend is not None else TorchAttentionBackend()
        vision = hf_config.vision_config
        self.vision_model = Llama4VisionModel(vision, backend)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(
            vision.vision_output_dim, hf_config.get_text_config().hidden_size, bias=False
        )
        self.graphs = None  # EncoderGraphs of `embed_tiles` once the decoder's are captured

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `Llama4Config`; weights come from the model's loader."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        """Checkpoint tensors named `vision_model.*` / `multi_modal_projector.*`."""
        load_checked(self, named_tensors)

    def embed_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """`[N, C, S, S]` tiles -> `[N, tokens_per_tile, text_hidden]` (what the CUDA graphs of
        `Llama4ForConditionalGeneration.enable_cuda_graphs` replay)."""
        return self.multi_modal_projector.linear_1(self.vision_model(tiles))

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call over every tile of every item (each tile its own segment):
        `[tiles * tokens_per_tile, text_hidden]` per item, tiles in the processor's order."""
        views = [it.data["pixel_values"] for it in items]  # [tiles, C, S, S] each
        # one item's as is (a cat would copy them, then the graph again)
        tiles = views[0] if len(views) == 1 else torch.cat(views)
        rows = (self.graphs or self.embed_tiles)(tiles)
        return [r.flatten(0, 1) for r in rows.split([v.shape[0] for v in views])]
