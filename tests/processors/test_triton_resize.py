"""`resize_uint8` (the GPU resize of uint8 frames) against torch's CPU kernel, bit for bit, on CPU
under TRITON_INTERPRET=1 (`tests/llm_core/interpreted.py`). On CUDA at full sizes (448 px to 12
MP): tests/processors/test_gpu_resize.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.processors.triton_resize import axis_taps, resize_uint8
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    test_interpreted_in_subprocess,  # noqa: F401
)


def _hwc_view(num, channels, height, width, seed=0):
    """uint8 [N, C, H, W] seen through a decoded [N, H, W, C] buffer (as the processor keeps it)."""
    gen = torch.Generator().manual_seed(seed)
    hwc = torch.randint(0, 256, (num, height, width, channels), dtype=torch.uint8, generator=gen)
    return hwc.permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "shape,size",
    [
        ((1, 3, 27, 29), (28, 28)),  # both sides change a little (1080p -> 1092x1932's kind)
        ((1, 3, 9, 13), (28, 28)),  # upscaled to min_pixels
        ((2, 1, 24, 21), (6, 6)),  # ~4x down: 9-11 taps a side; two frames
        ((1, 3, 10, 45), (10, 28)),  # width only: the height pass is skipped
        ((1, 3, 45, 10), (28, 10)),  # height only
        ((1, 1, 17, 13), (28, 14)),  # one channel
        ((3, 3, 5, 60), (6, 28)),  # very wide, odd frame count
    ],
)
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_uint8_equals_the_cpu_kernel(shape, size, mode):
    frames = _hwc_view(*shape)
    ref = F.interpolate(frames.contiguous(), size, mode=mode, antialias=True, align_corners=False)
    got = resize_uint8(frames, size, mode)
    assert got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got, ref)


def test_axis_taps_are_normalized_int16():
    table, precision = axis_taps(1920, 1932, "bicubic")
    first, used, weights = table[:, 0], table[:, 1], table[:, 2:]
    assert table.shape == (1932, 2 + 5) and 0 < precision <= 22  # scale < 1: 5 taps
    assert (first >= 0).all() and (first + used <= 1920).all()
    assert abs(weights).max() < 1 << 15
    sums = weights.sum(axis=1)  # each output's taps sum to one, up to int rounding
    assert (abs(sums - (1 << precision)) <= weights.shape[1]).all()


def test_resize_uint8_refuses_float_and_unknown_modes():
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(torch.zeros(1, 3, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="lanczos"):
        resize_uint8(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), (4, 4), "lanczos")
