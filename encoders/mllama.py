"""Mllama's tiled vision encoder (transformers' `MllamaVisionModel` + the projector of
`MllamaModel`): Llama 3.2 Vision's image states, which the decoder's cross-attention layers read.

An image comes as `max_num_tiles` tiles of `image_size` pixels (the processor's canvas split,
padded with zero tiles), and its aspect ratio id selects learned per-tile embeddings:

    patches (Conv2d, no bias) -> + gated pre-tile embedding (by aspect ratio) -> class token
    -> + gated position embedding ((1 - tanh g) * positions + tanh g * tile positions)
    -> LayerNorm -> pad each tile's patches to a multiple of 8
    -> local transformer over all tiles at once (ungated layers; some layers' outputs kept)
    -> LayerNorm -> + gated post-tile embedding -> global transformer (tanh-gated layers)
    -> drop the padding -> [final | kept layers] per patch -> projector to the text width

Attention inside the image is masked only between two padding positions (a padding tile or a
tile's padding patches), as transformers' `_prepare_aspect_ratio_attention_mask` builds it.
Here no mask is built: the transformers run on the tiles' rows reordered so that the image's
real rows come first (`_real_first`), and each attention is two unmasked SDPA calls, the real
rows' queries over every key, the padding rows' queries over the real keys only. The same pairs
meet as under the mask, on the fused kernels (a mask forces the slower masked ones) and with
no work on the pairs the mask drops (56% of the pairs for a one-tile image of 4). The two
outputs are projected and added to the residual's rows part by part inside the next
LayerNorm's kernel, so no layer concatenates them (H100, one 448 px image: the concatenation
and its re-layout were 2.7 of the tower's 37.6 ms); each MLP branch (times its gate) is added
inside the next layer's first LayerNorm (`add_layer_norm`: one kernel a norm on CUDA, rounded
as eager torch's `x + gate * branch`).
Images are grouped by their tile count, each group one pass (its own order).
`encode` gives each image `max_num_tiles * (patches + 1)` rows in tile order, the padding tiles'
rows included (the decoder's text before an image attends to them, as in transformers).

Names follow transformers' under the encoder root: `vision_model.*`, `multi_modal_projector.*`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.vision_layers import get_activation, load_checked, make_uninitialized
from polymodal.llm_core.layers.norm import add_layer_norm, residual_sum


class GatedAspectRatioEmbedding(nn.Module):
    """One learned `[max_tiles, dim]` offset per aspect ratio id, times tanh(gate)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        rows = len(cfg.supported_aspect_ratios) + 1  # id 0: padding
        self.embedding = nn.Embedding(rows, self.max_tiles * self.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [N, tiles, patches, dim]; ids: [N]
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.dim)
        return x + emb * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """Patch positions (shared by tiles) and per-aspect-ratio tile positions, mixed by a gate."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.empty(self.num_patches, self.dim))
        rows = len(cfg.supported_aspect_ratios) + 1
        self.tile_embedding = nn.Embedding(rows, self.max_tiles * self.num_patches * self.dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [N, tiles, patches + 1, dim]
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.num_patches, self.dim)
        tiles = self.tile_embedding(aspect_ratio_ids)
        tiles = tiles.view(-1, self.max_tiles, self.num_patches, self.dim)
        return x + gate * tiles


class MllamaVisionAttention(nn.Module):
    """Multi-head attention without biases over rows whose first `real` are the image's: those
    attend to every row, the padding rows after them to the first `real` only."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.num_heads = cfg.attention_heads
        self.head_dim = cfg.hidden_size // cfg.attention_heads
        dim = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.o_proj = nn.Linear(dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, real: int) -> tuple[torch.Tensor, ...]:
        """The output rows as parts: `(real rows,)`, or `(real rows, padding rows)` when there
        are padding rows, each `[N, rows, hidden]` (`add_layer_norm` adds them unconcatenated)."""
        n, length, _ = x.shape
        # [N, L, dim] -> [N, heads, L, head_dim]
        q, k, v = (
            p(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        parts = [F.scaled_dot_product_attention(q[:, :, :real], k, v)]
        if real < length:  # padding queries: the real keys only
            parts.append(
                F.scaled_dot_product_attention(q[:, :, real:], k[:, :, :real], v[:, :, :real])
            )
        # [N, heads, rows, head_dim] -> [N, rows, dim]: a view where SDPA wrote its output
        # rows-major (the fused kernels do, as q's layout), so o_proj reads it in place
        return tuple(self.o_proj(o.transpose(1, 2).reshape(n, o.shape[2], -1)) for o in parts)


class MllamaVisionLayer(nn.Module):
    """Pre-LayerNorm block; a global layer scales both branches by tanh of a learned gate."""

    def __init__(self, cfg, gated: bool) -> None:
        super().__init__()
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = _Mlp(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, pending: tuple, real: int) -> tuple[torch.Tensor, tuple]:
        """The layer's input is `residual_sum(x, *pending)`: the previous layer's MLP branch
        and its gate (or `(None, None)`) are added inside this layer's first norm, each
        attention part inside its second (`add_layer_norm`: one kernel each on CUDA, rounded
        as `x + gate * branch`); returns the sum so far and this layer's pending MLP branch."""
        x, h = add_layer_norm(self.input_layernorm, x, pending[0], gate=pending[1])
        parts = self.self_attn(h, real)
        gate = self.gate_attn.tanh() if self.gated else None
        x, h = add_layer_norm(self.post_attention_layernorm, x, parts, gate=gate)
        return x, (self.mlp(h), self.gate_ffn.tanh() if self.gated else None)


class _Mlp(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layers(nn.Module):
    """A stack of vision layers (HF's `MllamaVisionEncoder`: `layers.N`)."""

    def __init__(self, cfg, count: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionLayer(cfg, gated) for _ in range(count))


class MllamaVisionTower(nn.Module):
    """`[N, tiles, C, S, S]` pixels + aspect ratio ids `[N]` / tile counts (ints) -> `[N, tiles,
    patches + 1, vision_output_dim]` (the final states and the kept local layers',
    concatenated)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.kept = list(cfg.intermediate_layers_indices)
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, self.dim, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.empty(self.dim))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = GatedAspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = GatedAspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(self.dim)
        self.layernorm_post = nn.LayerNorm(self.dim)
        self.transformer = _Layers(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = _Layers(cfg, cfg.num_global_layers, gated=True)

    def forward(
        self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, num_tiles: list[int]
    ) -> torch.Tensor:
        n, tiles = pixels.shape[:2]
        weight = self.patch_embedding.weight
        x = F.conv2d(pixels.flatten(0, 1).to(weight.dtype), weight, stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2).reshape(n, tiles, -1, self.dim)  # [N, T, patches, D]
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.expand(n, tiles, 1, self.dim)
        x = self.gated_positional_embedding(torch.cat([cls, x], dim=2), aspect_ratio_ids)
        x = self.layernorm_pre(x)
        pad = (8 - self.num_patches % 8) % 8
        x = F.pad(x, (0, 0, 0, pad))  # [N, T, P + pad, D]
        counts = sorted(set(num_tiles))
        if len(counts) == 1:
            return self._transformers(x, aspect_ratio_ids, counts[0])
        out = None
        for count in counts:  # one pass per tile count, the batch's order kept
            members = torch.tensor([i for i, c in enumerate(num_tiles) if c == count],
                                   device=x.device)  # fmt: skip
            part = self._transformers(x[members], aspect_ratio_ids[members], count)
            if out is None:
                out = part.new_empty((n, *part.shape[1:]))
            out[members] = part
        return out

    def _transformers(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor, count: int):
        """The local and global transformers over images of `count` real tiles, `x` `[N, T, L,
        D]` (tiles padded to L rows), their rows reordered real first (`_real_first`)."""
        n, tiles, length = x.shape[:3]
        order, back = _real_first(count, tiles, self.num_patches, length, x.device)
        real = count * self.num_patches
        x = x.view(n, tiles * length, self.dim)[:, order]
        kept = {}  # layer index -> its output
        pending = (None, None)  # the last MLP branch and its gate, not added yet
        for i, layer in enumerate(self.transformer.layers):
            x, pending = layer(x, pending, real)
            if i in self.kept:
                x, pending = residual_sum(x, *pending), (None, None)
                kept[i] = x
        _, x = add_layer_norm(self.layernorm_post, x, pending[0], False, pending[1])
        x = x[:, back].view(n, tiles, length, self.dim)  # tile order
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids)
        x = x.view(n, tiles * length, self.dim)[:, order]
        pending = (None, None)
        for layer in self.global_transformer.layers:
            x, pending = layer(x, pending, real)
        x = residual_sum(x, *pending)
        # [N, T*L, D * (1 + kept)]: the final states, then the kept layers' features
        # interleaved (HF stacks them on a last axis and flattens), back in tile order
        stacked = torch.stack([kept[i] for i in self.kept], dim=-1).flatten(-2)
        x = torch.cat([x, stacked], dim=-1)[:, back]
        return x.view(n, tiles, length, -1)[:, :, : self.num_patches]


def _real_first(count: int, tiles: int, patches: int, length: int, device) -> tuple:
    """(order, its inverse) of the `tiles * length` rows of an image with `count` real tiles:
    the real rows (a tile below `count`, a patch below `patches`) first, then the padding rows,
    each in tile order (a stable sort on the device: no host sync)."""
    rows = torch.arange(tiles * length, device=device)
    padding = ((rows // length >= count) | (rows % length >= patches)).to(torch.int8)
    order = torch.argsort(padding, stable=True)
    return order, torch.argsort(order)


class MllamaVisionEncoder(nn.Module):
    """The vision tower and the projector: `encode(items)` gives each image's rows
    `[max_tiles * (patches + 1), text_hidden]` (tiles in order, padding tiles included)."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        vision = hf_config.vision_config
        self.vision_model = MllamaVisionTower(vision)
        text_hidden = hf_config.get_text_config().hidden_size
        self.multi_modal_projector = nn.Linear(vision.vision_output_dim, text_hidden, bias=True)

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `MllamaConfig` (parameters uninitialized)."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        load_checked(self, named_tensors)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call for all images (their `pixel_values` `[max_tiles, C, S, S]` staged,
        `aspect_ratio_id` and `num_tiles` from the processor)."""
        pixels = torch.stack([item.data["pixel_values"] for item in items])
        device = pixels.device
        ids = torch.tensor([int(item.data["aspect_ratio_id"]) for item in items], device=device)
        tiles = [int(item.data["num_tiles"]) for item in items]
        states = self.multi_modal_projector(self.vision_model(pixels, ids, tiles))
        return list(states.flatten(1, 2).unbind(0))  # [T * (patches + 1), text_hidden] each
