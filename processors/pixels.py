"""Pixel helpers shared by the image processors of every family (family-neutral).

`resize` reproduces torchvision's `resize` on the CPU (the kernel transformers' default image
processors call, on the CPU unless told otherwise) on uint8 CHW frames: torch's antialiased
kernels, natively on uint8 where torchvision takes that path (bicubic always on CPU, bilinear on
AVX2 / AVX512 / arm64), else through float32 with the same clamp and rounding. uint8 frames on a
CUDA device get the same pixels from a port of the CPU kernel (`triton_resize`), not
torchvision's GPU route (float32, then rounded: a level off here and there).

`normalize_frames` is the fused rescale + normalize of transformers' torchvision backend
(`(x - mean / r) / (std / r)` in float32), run on the model's device at staging time
(`MultimodalItem.pixel_fn`).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polymodal.llm_core.errors import ModelLoadError
from polymodal.processors.hashing import NUMPY_DTYPES, pixel_view
from polymodal.processors.hashing import image_key as hashed_image_key

# PIL resample codes used in HF configs -> torch interpolate modes
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


def _native_uint8(mode: str) -> bool:
    """Whether torchvision resizes uint8 natively (else through float32) on this CPU."""
    if mode == "bicubic":
        return True
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize(frames: torch.Tensor, size: tuple[int, int], resample: int = 3) -> torch.Tensor:
    """Antialiased resize of `[..., C, H, W]` frames to `size` (h, w), as torchvision's
    `resize(..., antialias=True)` on the CPU, wherever the frames are: uint8 stays uint8 (on a
    GPU: the CPU kernel's integer arithmetic, the same bits), float stays float (float frames,
    e.g. alpha-blended video, go through torch's float kernel of their device). Frames already
    of that size come back as is."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    mode = RESAMPLE_MODES.get(resample)
    if mode is None:
        raise ValueError(f"unsupported resample code {resample}; expected {list(RESAMPLE_MODES)}")
    shape = frames.shape
    batch = frames.reshape(-1, *shape[-3:])
    if frames.dtype == torch.uint8 and frames.is_cuda and _native_uint8(mode):
        from polymodal.processors.triton_resize import resize_uint8

        return resize_uint8(batch, size, mode).reshape(*shape[:-2], *size)
    if frames.dtype == torch.uint8 and _native_uint8(mode):
        out = F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=True)
    else:
        out = F.interpolate(
            batch.float(), size=size, mode=mode, align_corners=False, antialias=True
        )
        if frames.dtype == torch.uint8:
            if mode == "bicubic":
                out = out.clamp_(0, 255)
            out = out.round_().to(torch.uint8)
    return out.reshape(*shape[:-2], *size)


def image_to_frames(image) -> torch.Tensor:
    """A decoded RGB PIL image -> uint8 `[1, 3, H, W]` (a view of its HWC pixels, no copy)."""
    pixels = torch.from_numpy(np.array(image))  # [H, W, 3]
    return pixels.permute(2, 0, 1)[None]


def image_frames_in_place(image) -> tuple[torch.Tensor, bool]:
    """A decoded RGB PIL image -> (uint8 `[1, 3, H, W]`, whether it views Pillow's memory):
    the RGB of Pillow's own RGBX bytes where it exports them (`hashing.pixel_view`, no copy),
    else `image_to_frames`' copy (Pillow's `tobytes`: ~35 ms for a 4K image on an H100's host,
    where the view costs nothing and `copy_to` uploads the RGBX block as it is)."""
    view = pixel_view(image)
    if view is None:
        return image_to_frames(image), False
    return torch.from_numpy(view).permute(2, 0, 1)[None], True


def decoded_pixels(image, image_key: str | None = None) -> tuple[torch.Tensor, dict]:
    """A decoded RGB PIL image -> (uint8 `[1, 3, H, W]` frames, viewed in place where Pillow
    exports them (`image_frames_in_place`: no `tobytes` copy, ~35 ms for a 4K image on an
    H100's host), what its content hash covers of its pixels: `pixels_part`). `image_key`: the
    image's `hashing.image_key` where the caller has it (the processed-input cache's key of a
    PIL image loading left as it is), else it is taken here, in place."""
    frames, _ = image_frames_in_place(image)
    return frames, pixels_part(image, image_key, frames)


def pixels_part(image, image_key: str | None = None, frames: torch.Tensor | None = None) -> dict:
    """What a content hash covers of a decoded image's pixels: its `hashing.image_key` (given,
    or taken here in place), the same for the same pixels whatever the source (file, bytes,
    PIL image), so one hash instead of a second one over a copy; else its uint8 frames (HWC
    as stored: no copy; taken from `image` unless given)."""
    image_key = image_key or hashed_image_key(image)
    if image_key is not None:
        return {"image_key": torch.frombuffer(bytearray.fromhex(image_key), dtype=torch.uint8)}
    frames = image_to_frames(image) if frames is None else frames
    return {"frames": frames[0].permute(1, 2, 0)}


def split_tiles(frames: torch.Tensor, rows: int, cols: int, tile: int) -> torch.Tensor:
    """`[1, C, rows * tile, cols * tile]` (or `[C, ...]`) -> `[rows * cols, C, tile, tile]`,
    tiles row-major. Host tensors are laid out by numpy: torch's strided copy of this permute
    on the CPU took ~15 ms for a 672x672 uint8 canvas here, numpy's ~0.1 ms."""
    channels = frames.shape[-3]
    shape, order = (channels, rows, tile, cols, tile), (1, 3, 0, 2, 4)
    if frames.device.type == "cpu" and frames.dtype in NUMPY_DTYPES:
        array = frames.reshape(shape).numpy().transpose(order)
        tiles = torch.from_numpy(np.ascontiguousarray(array))
    else:
        tiles = frames.reshape(shape).permute(order)
    return tiles.reshape(rows * cols, channels, tile, tile)


def scaled_mean_std(mean, std, rescale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 mean and std pre-divided by the rescale factor (HF's fused rescale+normalize)."""
    scale = 1.0 / rescale_factor
    return torch.tensor(mean) * scale, torch.tensor(std) * scale


def normalize_frames(
    frames: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 `[N, C, H, W]` -> float32 `(x - mean) / std` per channel, cast to `dtype`, wherever
    `frames` are (`mean` / `std` from `scaled_mean_std`, host tensors).

    On CUDA mean and std go over in one pinned asynchronous copy: a pageable `.to(device)`
    waits for the stream to drain, i.e. a staging thread would wait for every step the engine
    queued before it (and a lone prompt's staging for its own upload and resize)."""
    if frames.is_cuda:
        from polymodal.llm_core.host_copy import copy_to

        mean, std = copy_to(torch.stack([mean, std]), frames.device).view(2, 1, -1, 1, 1)
    else:
        mean, std = (t.to(frames.device).view(1, -1, 1, 1) for t in (mean, std))
    out = frames.to(torch.float32, copy=True)
    out.sub_(mean).div_(std)
    return out.to(dtype)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file as a dict, None when absent; ModelLoadError when unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def image_processor_section(model_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's image processor settings: `preprocessor_config.json` (transformers v4
    layout), else the `image_processor` section of `processor_config.json` (v5)."""
    model_dir = Path(model_dir)
    section = read_json(model_dir / "preprocessor_config.json")
    if section is None:
        section = (read_json(model_dir / "processor_config.json") or {}).get("image_processor")
    return section or {}


def video_processor_section(model_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's video processor settings: `video_preprocessor_config.json` (v4 layout),
    else the `video_processor` section of `processor_config.json` (v5), else the image
    processor's (older checkpoints)."""
    model_dir = Path(model_dir)
    section = read_json(model_dir / "video_preprocessor_config.json")
    if section is None:
        section = (read_json(model_dir / "processor_config.json") or {}).get("video_processor")
    return section or image_processor_section(model_dir)


def processor_section(model_dir: str | Path) -> dict[str, Any]:
    """`processor_config.json`'s top level (the processor's own fields), or {}."""
    return read_json(Path(model_dir) / "processor_config.json") or {}
