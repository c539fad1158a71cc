"""The processor keeps the decoded uint8 frames (no host resize); `frames_to_pixel_values` turns
them into the very float32 pixel values of the plain pipeline (resize, repeat an image's frame,
normalize whole frames, patchify), bit for bit. Parity with HF's pixel values is checked in
test_qwen_image_parity and test_qwen_video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.processors import load_video, normalize_patches, preprocess_frames
from polymodal.processors.pixels import resize
from polymodal.processors.qwen_vision import patchify, smart_resize

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _reference(frames: torch.Tensor, cfg, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """float32 pixel values in the plain order: resize, repeat a single frame to the temporal
    patch, rescale + normalize whole frames (HF's fused float32 formula), patchify."""
    size = smart_resize(*frames.shape[-2:], cfg.factor, min_pixels, max_pixels)
    if size != tuple(frames.shape[-2:]):
        frames = resize(frames, size, cfg.resample)
    tp = cfg.temporal_patch_size
    if frames.shape[0] == 1:
        frames = frames.expand(tp, -1, -1, -1)
    if pad := -frames.shape[0] % tp:  # video: the last frame repeated
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    scale = 1.0 / cfg.rescale_factor
    mean, std = torch.tensor(cfg.image_mean) * scale, torch.tensor(cfg.image_std) * scale
    normed = frames.to(torch.float32).sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
    return patchify(normed, cfg.patch_size, cfg.merge_size, tp)[0]


def _frames(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "tiny", "camera"])
def test_image_item_keeps_decoded_frames_that_make_pixels_bitwise(name, photos, our_processors):
    ours = our_processors["qwen2_5_vl"]
    cfg = ours.config.image
    (item,) = ours.process(prompt=IMAGE, images=[photos[name]]).mm_items
    data = item.data
    assert "pixel_values" not in data  # no float work and no resize on the host
    decoded = _frames(photos[name])
    assert data["pixel_frames"].dtype == torch.uint8
    assert torch.equal(data["pixel_frames"], decoded)  # as decoded: the resize is the device's
    assert data["patch_layout"].tolist() == [1, 14, 2, cfg.temporal_patch_size]
    assert data["pixel_mean"].dtype == data["pixel_std"].dtype == torch.float32
    ref = _reference(decoded, cfg, cfg.min_pixels, cfg.max_pixels)
    got = item.pixel_values()
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert got.shape[0] == int(data["grid_thw"].prod())
    assert torch.equal(preprocess_frames(decoded, cfg)[0], ref)


def test_video_items_keep_frames_that_normalize_bitwise(photos, our_processors):
    ours = our_processors["qwen2_vl"]
    cfg = ours.config.video
    assert ours.config.video_total_pixels is None  # bounds below are the config's own
    base = photos["coffee"].resize((150, 100))
    rgb = [base.rotate(5 * i) for i in range(5)]  # odd: the last frame is repeated
    rgba = [np.asarray(photos["coffee_rgba"].resize((150, 100)))] * 2  # blended: float32
    for frames, dtype in ((rgb, torch.uint8), (rgba, torch.float32)):
        (item,) = ours.process(prompt=VIDEO, videos=[frames]).mm_items
        kept = item.data["pixel_frames"]
        decoded = load_video(frames).frames
        if dtype == torch.uint8:
            assert torch.equal(kept, decoded)  # as decoded, unpadded: the device resizes
        else:  # blended float32 frames are resized on the host (float kernels vary by device)
            assert kept.shape[:2] == decoded.shape[:2] and kept.shape[2:] != decoded.shape[2:]
        assert kept.dtype == dtype
        assert item.data["patch_layout"].tolist() == [2, 14, 2, 1]
        assert int(item.data["grid_thw"][0, 0]) == (len(frames) + 1) // 2
        ref = _reference(decoded, cfg, cfg.min_pixels, cfg.max_pixels)
        copy = kept.clone()
        assert torch.equal(item.pixel_values(), ref)
        assert torch.equal(kept, copy)  # making pixels left the item's frames as they were
        assert torch.equal(preprocess_frames(decoded, cfg)[0], ref)


def test_normalize_patches_casts_last():
    """Casting inside (before the temporal expand) gives the float32 result's cast, bitwise."""
    patches = torch.randint(0, 256, (12, 3, 1, 4), dtype=torch.uint8)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]) * 255
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]) * 255
    full = normalize_patches(patches, mean, std, repeat=2)
    assert full.shape == (12, 3 * 2 * 4)
    # [N, C, 2, 4]: both temporal halves are the one frame
    assert torch.equal(full.view(12, 3, 2, 4)[:, :, 0], full.view(12, 3, 2, 4)[:, :, 1])
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(normalize_patches(patches, mean, std, 2, dtype), full.to(dtype))


def test_image_at_grid_size_is_kept_without_a_copy(our_processors):
    """No resize needed: the item's frames are the decoded HWC pixels viewed as CHW (the
    patchify copy happens where the pixel values are made, on the model's device)."""
    ours = our_processors["qwen2_5_vl"]
    pixels = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    (item,) = ours.process(prompt=IMAGE, images=[Image.fromarray(pixels)]).mm_items
    frames = item.data["pixel_frames"]
    assert frames.shape == (1, 3, 56, 84) and not frames.is_contiguous()
    assert torch.equal(frames[0].permute(1, 2, 0), torch.from_numpy(pixels))
    assert item.data["grid_thw"].tolist() == [[1, 4, 6]]
