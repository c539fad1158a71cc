"""Pixel values from resized frames in one Triton kernel (CUDA): patchify, the float32
normalize, the temporal repeat and the cast to the model dtype.

`frames_to_pixel_values` calls it for RGB frames on the GPU, where the torch ops would take six
kernels plus two copies of mean/std. The math is the torch path's, element for element: the
frame value in float32, minus the mean, divided by the std with round-to-nearest division,
then cast, so the results are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Sizes and strides are not specialized on (Triton compiles a variant per "divisible by 16 or
# not" of each int): a first image of a new size compiled mid-request (~0.15 s on an H200).
_SIZE_ARGS = ["stride_t", "stride_c", "stride_h", "stride_w", "blocks_h", "blocks_w"]


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _patchify_normalize_kernel(
    frames_ptr,  # [T, 3, H, W], any strides (e.g. a decoded HWC image seen as CHW)
    out_ptr,  # [num_patches, 3 * T_PATCH * REPEAT * PATCH * PATCH]
    mean0, mean1, mean2, std0, std1, std2,  # fp32, pre-divided by the rescale factor
    stride_t, stride_c, stride_h, stride_w,
    blocks_h, blocks_w,  # merge blocks of a frame, down and across
    T_PATCH: tl.constexpr, REPEAT: tl.constexpr, PATCH: tl.constexpr, MERGE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Program per patch (output row). Rows go frame-group major, then merge block (row-major),
    then the patch inside its block; a row is [channel, temporal, y, x]."""
    n = tl.program_id(0)
    in_w = n % MERGE
    in_h = (n // MERGE) % MERGE
    block = n // (MERGE * MERGE)
    block_w = block % blocks_w
    block_h = (block // blocks_w) % blocks_h
    group = block // (blocks_w * blocks_h)
    temporal: tl.constexpr = T_PATCH * REPEAT
    offs = tl.arange(0, BLOCK)
    x = offs % PATCH
    y = (offs // PATCH) % PATCH
    t_out = (offs // (PATCH * PATCH)) % temporal
    c = offs // (PATCH * PATCH * temporal)
    mask = c < 3
    frame = group * T_PATCH + t_out // REPEAT  # an image's one frame serves every repeat
    row = (block_h * MERGE + in_h) * PATCH + y
    col = (block_w * MERGE + in_w) * PATCH + x
    src = (
        frame.to(tl.int64) * stride_t
        + c.to(tl.int64) * stride_c
        + row.to(tl.int64) * stride_h
        + col.to(tl.int64) * stride_w
    )
    value = tl.load(frames_ptr + src, mask=mask, other=0).to(tl.float32)
    mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))
    std = tl.where(c == 0, std0, tl.where(c == 1, std1, std2))
    pixel = tl.math.div_rn(value - mean, std)
    row_start = n.to(tl.int64) * (3 * temporal * PATCH * PATCH)
    tl.store(out_ptr + row_start + offs, pixel.to(out_ptr.dtype.element_ty), mask=mask)


def patchify_normalize(
    frames: torch.Tensor,
    mean: list[float],
    std: list[float],
    layout: tuple[int, int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Pixel values `[num_patches, 3 * t_patch * repeat * patch^2]` in `dtype` from RGB frames
    `[T, 3, H, W]` (uint8, or float32 0..255) on the frames' device; `mean` / `std` are the three
    float32 values of `scaled_mean_std`, `layout` is `plan_patches`' (t_patch, patch,
    merge, repeat)."""
    t_patch, patch, merge, repeat = layout
    num_frames, channels, height, width = frames.shape
    if channels != 3:
        raise ValueError(f"patchify_normalize takes RGB frames, got {channels} channels")
    blocks_h, blocks_w = height // (patch * merge), width // (patch * merge)
    num_patches = (num_frames // t_patch) * blocks_h * blocks_w * merge * merge
    row = 3 * t_patch * repeat * patch * patch
    out = torch.empty((num_patches, row), dtype=dtype, device=frames.device)
    if num_patches:
        _patchify_normalize_kernel[(num_patches,)](
            frames, out, *mean, *std, *frames.stride(), blocks_h, blocks_w, T_PATCH=t_patch,
            REPEAT=repeat, PATCH=patch, MERGE=merge, BLOCK=triton.next_power_of_2(row),
        )  # fmt: skip
    return out
