"""`patchify_normalize` (the GPU path of `frames_to_pixel_values`) against the torch path, on
CPU under TRITON_INTERPRET=1 (set up in `tests/llm_core/interpreted.py`). Bit-exactness in bf16
on CUDA: tests/llm_core/test_media_staging.py's GPU test."""

from __future__ import annotations

import pytest
import torch

from polymodal.processors.qwen_vision import (
    VisionPreprocessConfig,
    frames_to_pixel_values,
    plan_patches,
    scaled_mean_std,
)
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

CFG = VisionPreprocessConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)


def _frames(num_frames: int, height: int, width: int, dtype=torch.uint8) -> torch.Tensor:
    """[T, 3, H, W] seen through a decoded [T, H, W, 3] buffer: a permuted view."""
    hwc = torch.randint(0, 256, (num_frames, height, width, 3), dtype=torch.uint8)
    return hwc.to(dtype).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "num_frames,height,width,dtype",
    [(1, 56, 84, torch.uint8), (1, 112, 56, torch.uint8), (3, 56, 56, torch.uint8),
     (4, 84, 56, torch.float32)],
)  # fmt: skip
def test_patchify_normalize_matches_torch(num_frames, height, width, dtype):
    from polymodal.processors.triton_pixels import patchify_normalize

    frames = _frames(num_frames, height, width, dtype)
    size, layout, _ = plan_patches(frames, CFG)
    assert size == (height, width)  # grid-sized: no resize
    if pad := -num_frames % layout[0]:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    mean, std = scaled_mean_std(CFG)
    ref = frames_to_pixel_values(frames, mean, std, layout)  # host: the torch ops
    got = patchify_normalize(frames, mean.tolist(), std.tolist(), layout, torch.float32)
    assert got.shape == ref.shape and torch.equal(got, ref)
    got = patchify_normalize(frames, mean.tolist(), std.tolist(), layout, torch.bfloat16)
    assert_close(got, ref.to(torch.bfloat16), torch.bfloat16)


def test_patchify_normalize_takes_rgb_only():
    from polymodal.processors.triton_pixels import patchify_normalize

    frames = torch.zeros((1, 4, 56, 56), dtype=torch.uint8)
    with pytest.raises(ValueError, match="4 channels"):
        patchify_normalize(frames, [0.0] * 3, [1.0] * 3, (1, 14, 2, 2), torch.float32)
