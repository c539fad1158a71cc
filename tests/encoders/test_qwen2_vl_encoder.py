"""Qwen2-VL vision tower: parity with transformers on a tiny checkpoint, backend plumbing."""

import pytest
import torch
import transformers as tf

from polymodal.encoders import load_encoder
from polymodal.encoders.loading import read_vision_tensors
from polymodal.encoders.qwen2_vl import Qwen2VisionTower
from polymodal.llm_core.attention import TorchAttentionBackend

GRIDS = {
    "one_image": [[1, 8, 12]],
    "three_images": [[1, 8, 12], [1, 4, 6], [1, 6, 10]],
    "video": [[2, 6, 8]],
    "video_and_image": [[3, 4, 4], [1, 2, 2]],
}


@pytest.fixture(scope="module")
def tower(vl_checkpoint):
    return load_encoder(vl_checkpoint("qwen2_vl"))


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_matches_transformers(case, tower, random_pixels, hf_embeddings):
    pixel_values, grid_thw = random_pixels(GRIDS[case])
    with torch.no_grad():
        ours = tower(pixel_values, grid_thw)
    ref = hf_embeddings("qwen2_vl", pixel_values, grid_thw)
    assert ours.shape == ref.shape == (grid_thw.prod(-1).sum() // 4, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_from_hf_config_object(vl_checkpoint, tower, random_pixels):
    """from_config accepts the transformers config object as well as config.json's dict."""
    hf_config = tf.AutoConfig.from_pretrained(vl_checkpoint("qwen2_vl")).vision_config
    other = Qwen2VisionTower.from_config(hf_config, dtype=torch.float32, device="cpu")
    other.load_weights(read_vision_tensors(vl_checkpoint("qwen2_vl")))
    pixel_values, grid_thw = random_pixels([[1, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(other(pixel_values, grid_thw), tower(pixel_values, grid_thw))


class RecordingBackend(TorchAttentionBackend):
    """Torch reference backend that records the segments of every varlen call."""

    def __init__(self):
        self.segments = []

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale, causal=False):
        self.segments.append((cu_seqlens.tolist(), max_seqlen, causal))
        return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal)


def test_attention_goes_through_backend_per_frame(vl_checkpoint, random_pixels):
    backend = RecordingBackend()
    tower = load_encoder(vl_checkpoint("qwen2_vl"), backend=backend)
    pixel_values, grid_thw = random_pixels([[2, 4, 6], [1, 2, 4]])
    with torch.no_grad():
        tower(pixel_values, grid_thw)
    # one call per block (depth 2), each with one segment per frame: 24, 24, 8 patches
    assert backend.segments == [([0, 24, 48, 56], 24, False)] * 2
