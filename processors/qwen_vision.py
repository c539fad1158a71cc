"""Qwen2-VL / Qwen2.5-VL pixel pipeline: smart resize, patchify, rescale + normalize.

Mirrors transformers' default (torchvision-backend) `Qwen2VLImageProcessor` and
`Qwen2VLVideoProcessor` as they run by default, on the CPU: a uint8 CHW frame is resized with
torch's antialiased bicubic kernel (`pixels.resize`; on a GPU its bit-exact port), cut into
patches of `C * temporal_patch * patch * patch` values ordered so that each `merge x merge`
block of patches is contiguous (the vision tower merges them into one slot), and normalized with
the fused `(x - mean / rescale) / (std / rescale)` in float32. Each element is normalized on its
own, so patchifying the uint8 first gives the same values.

The processor only plans (`plan_patches`: target size, grid, layout) and keeps the decoded
frames as they are; `frames_to_pixel_values` resizes, patchifies and normalizes them later,
wherever they are: on the model's device at staging (a GPU resizes a 4K frame in well under a
millisecond; the host took 26-38 ms), on the host for a CPU model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polymodal.processors.pixels import resize

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """The numbers that define the pixel pipeline (read from the checkpoint's processor config)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merged slot covers factor x factor pixels)."""
        return self.patch_size * self.merge_size


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Qwen's target (h, w): sides divisible by `factor`, area in [min, max] pixels, aspect kept.

    Raises ValueError when the aspect ratio exceeds 200 (as the reference does).
    """
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(
            f"absolute aspect ratio must be at most 200, got {ratio:.1f} ({width}x{height})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def scaled_mean_std(cfg: VisionPreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 mean and std pre-divided by the rescale factor (HF's fused rescale+normalize)."""
    scale = 1.0 / cfg.rescale_factor
    return torch.tensor(cfg.image_mean) * scale, torch.tensor(cfg.image_std) * scale


def normalize_patches(
    patches: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    repeat: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Patches `[N, C, t, p*p]` (uint8, or float32 0..255 for alpha-blended video) -> normalized
    pixel values `[N, C*t*repeat*p*p]` in `dtype`.

    The one normalization of the pixel pipeline, run wherever `patches` are (host or device;
    `mean`/`std` from `scaled_mean_std`, on the same device): to float32, subtract the scaled
    mean, divide by the scaled std (HF's fused rescale+normalize, so the same float32 rounding),
    then cast. `repeat > 1` (needs t == 1) expands an image's one frame to the temporal patch;
    it comes after the cast, which is elementwise, so the values are those of casting last.
    """
    num_patches = patches.shape[0]
    # copy=True: float32 patches (alpha-blended video) stay as they are; then in place (one
    # fresh buffer, not three: each costs page faults on the host)
    out = patches.to(torch.float32, copy=True)
    out.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    out = out.to(dtype)
    if repeat > 1:  # [N, C, 1, p*p] -> [N, C, repeat, p*p]
        out = out.expand(-1, -1, repeat, -1)
    return out.reshape(num_patches, -1)


def patchify(
    frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`[T, C, H, W]` frames (T a multiple of the temporal patch) -> (`[t*h*w, C*tp*p*p]`
    patches, grid `(t, h, w)`): each merge block's `merge x merge` patches are adjacent rows."""
    tp, p, m = temporal_patch_size, patch_size, merge_size
    num_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    # [gt, tp, C, gh/m, m, p, gw/m, m, p]
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> [gt, gh/m, gw/m, m, m, C, tp, p, p]: each merge block's m*m patches are adjacent rows
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return patches.contiguous(), (grid_t, grid_h, grid_w)


def plan_patches(
    frames: torch.Tensor,
    cfg: VisionPreprocessConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int, int]]:
    """Where `[T, 3, H, W]` frames (one image is T=1) go on Qwen's grid, without touching them.

    Returns (resized size `(h, w)`, layout, grid `(t, h, w)` in patches). `layout` is
    `(t_patch, patch, merge, repeat)`: `frames_to_pixel_values(frames, *scaled_mean_std(cfg),
    layout, size=size)` gives the pixel values. An image's single frame is patchified once
    (`t_patch` = 1) and repeated `temporal_patch_size` times (`repeat`) on normalizing, as the
    reference repeats the frame; video frames are padded to a multiple of the temporal patch by
    repeating the last one (`t_patch` = temporal_patch_size, repeat 1). Raises ValueError for an
    aspect ratio over 200.
    """
    num_frames, _, height, width = frames.shape
    size = smart_resize(
        height,
        width,
        factor=cfg.factor,
        min_pixels=cfg.min_pixels if min_pixels is None else min_pixels,
        max_pixels=cfg.max_pixels if max_pixels is None else max_pixels,
    )
    tp = cfg.temporal_patch_size
    repeat = tp if num_frames == 1 else 1
    t_patch = tp // repeat
    p = cfg.patch_size
    grid = (-(-num_frames // t_patch), size[0] // p, size[1] // p)
    return size, (t_patch, p, cfg.merge_size, repeat), grid


def frames_to_pixel_values(
    frames: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    layout: tuple[int, int, int, int],
    dtype: torch.dtype = torch.float32,
    *,
    size: tuple[int, int] | None = None,
    resample: int = 3,
) -> torch.Tensor:
    """Decoded `[T, 3, H, W]` frames (any strides) -> pixel values `[num_patches, patch_dim]` in
    `dtype`, wherever `frames` are (host or device): resize to `size` (`plan_patches`; bicubic
    at scale 1 is the identity, so frames of that size are not touched), pad to whole temporal
    patches with the last frame, patchify, then `normalize_patches`. `mean` / `std` are host
    tensors (`scaled_mean_std`); RGB frames on a CUDA device are patchified and normalized by
    one Triton kernel that gives the same bits (`triton_pixels`)."""
    if size is not None:
        frames = resize(frames, size, resample)
    t_patch, patch, merge, repeat = layout
    if pad := -frames.shape[0] % t_patch:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
    if frames.is_cuda and frames.shape[1] == 3:
        from polymodal.processors.triton_pixels import patchify_normalize

        return patchify_normalize(frames, mean.tolist(), std.tolist(), layout, dtype)
    mean, std = mean.to(frames.device), std.to(frames.device)
    patches, _ = patchify(frames, patch, merge, t_patch)
    patches = patches.view(patches.shape[0], frames.shape[1], t_patch, -1)  # [N, C, t, p*p]
    return normalize_patches(patches, mean, std, repeat, dtype)


def preprocess_frames(
    frames: torch.Tensor,
    cfg: VisionPreprocessConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resize, patchify and normalize `[T, 3, H, W]` frames (one image is T=1) where they are.

    An image's single frame is repeated `temporal_patch_size` times, as the reference does.
    Returns float32 `pixel_values [t*h*w, patch_dim]` and the grid `(t, h, w)` in patches.
    (The processor keeps the decoded frames instead; the model's device does all of this.)
    """
    size, layout, grid = plan_patches(frames, cfg, min_pixels=min_pixels, max_pixels=max_pixels)
    mean, std = scaled_mean_std(cfg)
    return frames_to_pixel_values(frames, mean, std, layout, size=size, resample=cfg.resample), grid
