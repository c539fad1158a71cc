"""Qwen2.5-VL vision tower: parity with transformers (window + full attention), window index."""

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from polymodal.encoders import load_encoder
from polymodal.encoders.qwen2_5_vl import window_partition
from polymodal.llm_core.attention import TorchAttentionBackend

# Tiny config: patch 14, merge 2, window_size 56 -> windows of 2x2 merged patches (4x4 patches).
GRIDS = {
    "one_image": [[1, 8, 12]],
    "partial_windows": [[1, 10, 14]],  # merged 5x7: last window row/column is partial
    "many_windows": [[1, 12, 16]],  # merged 6x8: 12 full windows
    "three_images": [[1, 10, 14], [1, 4, 6], [1, 6, 4]],
    "video": [[2, 10, 6]],
    "smaller_than_window": [[1, 2, 2]],
}


@pytest.fixture(scope="module")
def tower(vl_checkpoint):
    return load_encoder(vl_checkpoint("qwen2_5_vl"))


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_matches_transformers(case, tower, random_pixels, hf_embeddings):
    pixel_values, grid_thw = random_pixels(GRIDS[case])
    with torch.no_grad():
        ours = tower(pixel_values, grid_thw)
    ref = hf_embeddings("qwen2_5_vl", pixel_values, grid_thw)
    assert ours.shape == ref.shape == (grid_thw.prod(-1).sum() // 4, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_bfloat16_close_to_fp32_reference(vl_checkpoint, random_pixels, hf_embeddings):
    tower = load_encoder(vl_checkpoint("qwen2_5_vl"), dtype=torch.bfloat16)
    assert tower.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    pixel_values, grid_thw = random_pixels(GRIDS["three_images"])
    with torch.no_grad():
        ours = tower(pixel_values, grid_thw)
    ref = hf_embeddings("qwen2_5_vl", pixel_values, grid_thw)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize(
    "grid", [[[1, 10, 14]], [[1, 12, 16]], [[2, 6, 18], [1, 2, 2], [3, 14, 10]], [[1, 30, 4]]]
)
@pytest.mark.parametrize("window_size", [56, 112])
def test_window_partition_matches_transformers(grid, window_size):
    grid_thw = torch.tensor(grid)
    ref_index, ref_cu = get_vision_window_index(grid_thw, 2, window_size, 14)
    index, meta = window_partition(grid, 2, window_size // 14 // 2, torch.device("cpu"))
    assert torch.equal(index, ref_index)
    assert torch.equal(meta.cu_seqlens, ref_cu)
    assert meta.max_seqlen == int(ref_cu.diff().max())


class RecordingBackend(TorchAttentionBackend):
    """Torch reference backend that records the segments of every varlen call."""

    def __init__(self):
        self.segments = []

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale, causal=False):
        self.segments.append((cu_seqlens.tolist(), max_seqlen))
        return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal)


def test_window_and_full_blocks_use_their_segments(vl_checkpoint, random_pixels):
    backend = RecordingBackend()
    tower = load_encoder(vl_checkpoint("qwen2_5_vl"), backend=backend)
    pixel_values, grid_thw = random_pixels([[1, 6, 4]])  # merged 3x2 -> windows of 4 + 2
    with torch.no_grad():
        tower(pixel_values, grid_thw)
    window, full = ([0, 16, 24], 16), ([0, 24], 24)
    # fullatt_block_indexes = [1, 3] in the tiny config
    assert backend.segments == [window, full, window, full]
