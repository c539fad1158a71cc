"""VILA's projectors and NVILA's compression: each projector kind against the public code's
`view` / `permute` fold (`vila_reference.build_projector` / `flat_square`) on odd and even
grids; the properties the public code implies: a one-tile image through the dynamic-S2 path
equals the single-scale path when there is one scale; the S2 merge of one tile per scale with
`s2_resize_output_to_scale_idx=0` equals the channel-stacked maps; temporal pooling of T
frames gives `T / t` frames of tokens and of identical frames returns that frame; the token
counts the processor promises are the rows the encoder returns."""

import math

import pytest
import torch
from torch import nn

from polymodal.bench.vila_reference import flat_square, merge_chessboard, split_chessboard
from polymodal.encoders.vila import VilaEncoder, merge_tiles, split_tiles
from polymodal.encoders.vila_projector import (
    SpaceToChannel,
    VilaProjector,
    temporal_spatial_pool,
)
from polymodal.llm_core.models.vila import VilaConfig
from polymodal.llm_core.models.vila_tiny import TINY_SIGLIP
from polymodal.processors.types import MultimodalItem

KINDS = {  # kind: its k x k fold
    "mlp_downsample": 2,
    "mlp_downsample_2x2_fix": 2,
    "mlp_downsample_3x3_fix": 3,
    "mlp_downsample_3x3_s2": 3,
    "mlp_downsample_3x3_s2_new": 3,
}


def reference_projector(kind: str, m: int, h: int) -> nn.Sequential:
    """VILA's `MultimodalProjector.layers`, written out (index 0: the parameter-free fold)."""

    class Fold(nn.Module):
        def forward(self, x):
            side = int(x.shape[1] ** 0.5)
            y = flat_square(x.reshape(x.shape[0], side, side, -1), KINDS[kind])
            return y.reshape(y.shape[0], -1, y.shape[-1])

    L, N, G = nn.Linear, nn.LayerNorm, nn.GELU
    layers = {
        "mlp_downsample": [N(4 * m), L(4 * m, h), G(), L(h, h)],
        "mlp_downsample_2x2_fix": [N(4 * m), L(4 * m, h), G(), L(h, h)],
        "mlp_downsample_3x3_fix": [
            N(9 * m), L(9 * m, 3 * m), G(), N(3 * m), L(3 * m, h), G(), L(h, h),
        ],
        "mlp_downsample_3x3_s2": [
            N(9 * m), L(9 * m, 3 * m), G(), N(3 * m), L(3 * m, m), G(), N(m), L(m, m // 3), G(),
            N(m // 3), L(m // 3, h), G(), L(h, h),
        ],
        "mlp_downsample_3x3_s2_new": [
            N(9 * m), L(9 * m, 4 * m), G(), N(4 * m), L(4 * m, 2 * m), G(), N(2 * m), L(2 * m, m),
            G(), N(m), L(m, m // 3), G(), N(m // 3), L(m // 3, h), G(), L(h, h),
        ],
    }[kind]  # fmt: skip
    return nn.Sequential(Fold(), *layers)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("side", [4, 5, 7])
def test_projector_matches_the_public_fold(kind, side):
    torch.manual_seed(0)
    m, h = 12, 16
    ref = reference_projector(kind, m, h)
    with torch.no_grad():
        for p in ref.parameters():  # LayerNorms random too, so their order matters
            p.normal_(0, 0.5)
    ours = VilaProjector(kind, m, h)
    ours.layers.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, side * side, m)
    expected = ref(x)
    assert expected.shape[1] == math.ceil(side / KINDS[kind]) ** 2
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"])
def test_plain_projectors_keep_every_feature(kind):
    proj = VilaProjector(kind, 8, 8)
    assert proj.downsample == 1
    assert proj(torch.randn(2, 9, 8)).shape == (2, 9, 8)


def test_space_to_channel_order():
    """A token's input is its block's features row by row: (0,0), (0,1), (1,0), (1,1)."""
    x = torch.arange(16.0).view(1, 16, 1)  # 4 x 4 grid, feature = raster index
    out = SpaceToChannel(2)(x)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 1].tolist() == [2, 3, 6, 7]


def test_tiles_round_trip_the_public_chessboard():
    grid = torch.randn(1, 5, 6, 8)
    tiles = split_chessboard(grid, 2, 4)
    torch.testing.assert_close(split_tiles(grid[0], 2, 4), tiles, rtol=0, atol=0)
    torch.testing.assert_close(merge_tiles(tiles, 2, 4), merge_chessboard(tiles, 2, 4)[0])


def _encoder(**fields) -> VilaEncoder:
    torch.manual_seed(0)
    text = dict(model_type="qwen2", hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text.update(num_attention_heads=2, num_key_value_heads=1)
    cfg = VilaConfig(
        llm_cfg=text,
        vision_tower_cfg=TINY_SIGLIP,
        mm_projector_cfg={"mm_projector_type": "mlp_downsample"},
        mm_vision_select_layer=-2,
        **fields,
    )
    enc = VilaEncoder(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.3)
    return enc.eval()


def _item(pixels, modality="image", block=None):
    data = {"pixel_values": pixels}
    if block is not None:
        data["block_size"] = torch.tensor(block)
    return MultimodalItem(modality, data, 0, 0, "x")


def test_one_tile_s2_path_equals_the_single_scale_path():
    """One scale: the dynamic-S2 merge of a 1 x 1 grid is the plain view (public code:
    `block_size=None` repeats the features once per scale)."""
    enc = _encoder(dynamic_s2=True, s2_scales="28", s2_resize_output_to_scale_idx=-1)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        tiled, single = enc.encode([_item(pixels, block=(1, 1)), _item(pixels)])
    torch.testing.assert_close(tiled, single, rtol=0, atol=0)
    assert tiled.shape == (4, 16)  # (4 / 2)^2 tokens


def test_s2_merge_at_the_first_scale_stacks_the_scales_maps():
    """With the output at scale 0 and one tile a scale (28 / 56 / 84 views of equal size), the
    merged input is the three views' maps stacked on the channels, area-resized to 4 x 4."""
    enc = _encoder(dynamic_s2=True, s2_scales="28,28,28", s2_resize_output_to_scale_idx=0)
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        feats = enc.vision_tower(pixels, -2)  # [3, 16, 32]
        merged = enc.multi_scale(feats, 1, 1)  # [1, 16, 96]
    expected = torch.cat(list(feats), dim=-1)[None]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_temporal_pooling_counts_and_identity():
    frames = torch.randn(8, 16, 5)
    assert temporal_spatial_pool(frames, (4, 1, 1)).shape == (2, 16, 5)
    assert temporal_spatial_pool(frames, (2, 2, 2)).shape == (4, 4, 5)
    same = frames[:1].expand(4, -1, -1)
    torch.testing.assert_close(temporal_spatial_pool(same, (4, 1, 1))[0], frames[0])


@pytest.mark.parametrize("pools", [[[2, 1, 1]], [[2, 1, 1], [4, 2, 2]], [[1, 2, 1]]])
def test_video_rows_are_the_published_count(pools):
    """T frames, each (4 / 2)^2 = 4 tokens: sum over pools of (T / t) * (2 / h) * (2 / w)."""
    video = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": pools}
    enc = _encoder(dynamic_s2=True, s2_scales="28,56,84", video_encoder=video)
    frames = 8
    with torch.no_grad():
        (out,) = enc.encode([_item(torch.randn(frames, 3, 28, 28), "video")])
    expected = sum((frames // t) * (2 // h) * (2 // w) for t, h, w in pools)
    assert out.shape == (expected, 16)
