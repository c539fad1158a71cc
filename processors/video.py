"""Load a video as `[T, 3, H, W]` frames: decoded from a file (decord, or PyAV where decord is
missing: aarch64, macOS), or given as frames.

Frame sampling follows transformers' `Qwen2VLVideoProcessor.sample_frames`: `num_frames` is
rounded to a multiple of the temporal patch size; `fps` asks for that many frames per second,
clamped to `[min_frames, max_frames]` and to the video's length, rounded down to a multiple of
the temporal patch size; indices are `arange(0, total, total / n)`. Frames get the reference's
RGB conversion for videos: grayscale is repeated, transparent RGBA is blended onto white.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from polymodal.processors.hashing import hash_pixels, hasher, rgbx_view
from polymodal.processors.item_pool import run_items
from polymodal.processors.media import media_error, read_source_bytes

DEFAULT_FRAME_LIST_FPS = 24.0  # what transformers assumes for frames given without metadata
DEFAULT_MAX_VIDEO_PIXELS = 2_000_000_000  # decoded frames * height * width, checked before decode


@dataclass
class VideoFrames:
    """Decoded frames `[T, 3, H, W]` (uint8, or float32 after alpha blending) and their rate."""

    frames: torch.Tensor
    sampled_fps: float  # frames per second of the sampled frames (for seconds-per-grid)


def sample_indices(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    temporal_patch_size: int = 2,
    min_frames: int = 4,
    max_frames: int = 768,
) -> torch.Tensor:
    """Frame indices to decode, as transformers' Qwen2-VL video processor picks them."""
    if fps is not None and num_frames is not None:
        raise ValueError("pass either fps or num_frames, not both")
    tp = temporal_patch_size
    if num_frames is not None:
        count = round(num_frames / tp) * tp
    elif fps is not None:
        cap = (min(max_frames, total_frames) // tp) * tp
        count = min(max(total_frames / video_fps * fps, min_frames), cap, total_frames)
        count = int(count // tp) * tp
    else:
        return torch.arange(0, total_frames).int()
    if count <= 0:
        raise ValueError(f"sampling gives {count} frames from a {total_frames}-frame video")
    if count > total_frames:
        raise ValueError(f"asked for {count} frames but the video has only {total_frames}")
    # float32 arange then truncation, exactly like the reference (so boundary cases agree)
    return torch.arange(0, total_frames, total_frames / count).int()


def frames_to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """`[T, C, H, W]` with C in 1/3/4 -> 3 channels; transparent pixels are blended onto white."""
    channels = frames.shape[1]
    if channels == 1:
        return frames.expand(-1, 3, -1, -1)
    if channels == 3:
        return frames
    if channels != 4:
        raise ValueError(f"frames must have 1, 3 or 4 channels, got {channels}")
    if not (frames[:, 3] < 255).any():
        return frames[:, :3]
    alpha = frames[:, 3:4] / 255.0  # float32 [T, 1, H, W]
    return (1 - alpha) * 255 + alpha * frames[:, :3]


def _frame_source(frame: Any) -> tuple[Image.Image | np.ndarray, tuple[int, ...]]:
    """One frame (PIL, HW/HWC numpy, CHW/HWC tensor) -> (what to copy its pixels from: a PIL
    image in RGB / RGBA / L or an HWC uint8 array, its `(H, W, C)` shape); nothing is copied."""
    if isinstance(frame, Image.Image):
        if frame.mode not in ("RGB", "RGBA", "L"):
            frame = frame.convert("RGB")
        return frame, (frame.height, frame.width, len(frame.getbands()))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        if frame.ndim == 3 and frame.shape[0] in (1, 3, 4) and frame.shape[-1] not in (1, 3, 4):
            frame = frame.permute(1, 2, 0)
        frame = frame.numpy()
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"unsupported frame type {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frame.dtype}")
    frame = frame[..., None] if frame.ndim == 2 else frame
    if frame.ndim != 3:
        raise ValueError(f"a frame must be HxW or HxWxC, got shape {frame.shape}")
    return frame, frame.shape


def frame_sources(frames: Any, max_pixels: int) -> tuple[list, tuple[int, ...]]:
    """A list of frames or a `[T, H, W, C]` array -> (`_frame_source` of each, their one
    `(H, W, C)` shape), checked against `max_pixels` before any pixel is copied."""
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        frames = list(frames)
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ValueError("a video must be a file, bytes, or a non-empty list of frames")
    pairs = [_frame_source(frame) for frame in frames]
    sources = [source for source, _ in pairs]
    shapes = {shape for _, shape in pairs}
    if len(shapes) != 1:
        raise ValueError(f"all frames must have one shape, got {sorted(shapes)}")
    shape = shapes.pop()
    height, width = shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"the frames are empty ({width}x{height})")
    if len(sources) * height * width > max_pixels:
        raise ValueError(
            f"{len(sources)} frames of {width}x{height} exceed the limit of {max_pixels} pixels"
        )
    return sources, shape


def frames_key(frames: Any, max_pixels: int) -> str:
    """BLAKE3 (hex) of a frame list's pixels as `frames_from_list` reads them (count, shape,
    every byte): equal content gives one key whatever objects hold it, one changed pixel
    another. Frames are hashed one at a time and not kept: a processed-input cache hit then
    costs the hash of each frame's memory (PIL frames read in place: `hash_pixels`), with no
    stacking (holding all 64 frames of 720p as copies made those reads ~3x slower on the CPU
    box: 177 MB of fresh pages)."""
    sources, shape = frame_sources(frames, max_pixels)
    digest = hasher(len(sources) * int(np.prod(shape)))
    digest.update(f"frames|{len(sources)}|{shape}|".encode())
    for source in sources:
        # a PIL frame's own memory where Pillow exports it (no copy: ~1 ms a 720p frame on an
        # H200's host), else its bytes as `frames_from_list` reads them; tagged, so the two
        # forms never run together into one byte stream
        if isinstance(source, Image.Image) and hash_pixels(digest, source, b"|view|"):
            continue
        digest.update(b"|copy|")
        digest.update(np.ascontiguousarray(np.asarray(source).reshape(shape)))
    return digest.hexdigest()


def frames_from_list(frames: Any, max_pixels: int) -> torch.Tensor:
    """A list of frames or a `[T, H, W, C]` array -> `[T, 3, H, W]` RGB tensor.

    Each frame's pixels are copied once, straight into one `[T, H, W, C]` buffer (a PIL
    frame's `np.asarray` view of its bytes, an array itself): the result never shares memory
    with the caller's frames, so changing them later cannot change what was hashed."""
    sources, shape = frame_sources(frames, max_pixels)
    views = _rgbx_views(sources)
    if views is not None:  # RGB frames Pillow exports: their RGBX memory, one dense copy each
        video = np.empty((len(views), *shape[:2], 4), dtype=np.uint8)  # [T, H, W, RGBX]

        def copy(start: int) -> None:  # (numpy copies without the GIL)
            for t in range(start, len(views), COPY_JOBS):
                video[t] = views[t]

        # side by side: the fresh buffer's page faults cost more than the bytes (64 frames
        # of 720p: 74 ms on one thread of an H200's host)
        run_items([partial(copy, start) for start in range(min(COPY_JOBS, len(views)))])
        return torch.from_numpy(video)[..., :3].permute(0, 3, 1, 2)  # [T, 3, H, W], a view
    video = np.empty((len(sources), *shape), dtype=np.uint8)  # [T, H, W, C]
    for out, source in zip(video, sources):
        out[...] = np.asarray(source).reshape(shape)
    return frames_to_rgb(torch.from_numpy(video).permute(0, 3, 1, 2))  # [T, C, H, W]


COPY_JOBS = 8  # `frames_from_list`'s copies of in-place frames, on the media item pool


def _rgbx_views(sources: list) -> list[np.ndarray] | None:
    """Each frame's `rgbx_view` when every frame is an RGB PIL image that has one, else None.
    Copying those is one memcpy a frame (64 frames of 720p: ~11 ms on the CPU box), where
    `np.asarray` goes through Pillow's `tobytes` (~90 ms on an H100's host) and a 3-of-4-byte
    strided copy would take ~250 ms; the pad bytes ride along to the device (`copy_to`
    uploads the dense block and drops them there)."""
    views = []
    for source in sources:
        view = rgbx_view(source) if isinstance(source, Image.Image) else None
        if view is None:
            return None
        views.append(view)
    return views


def _video_backend() -> str:
    """decord where it is installed (x86-64 only), else PyAV: the same FFmpeg decode."""
    for name in ("decord", "av"):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    raise ImportError(
        "reading video files needs decord or PyAV: pip install 'polymodal[video]' "
        "(or pass the video as a list of frames)"
    )


def decode_video_file(source: Any, *, max_pixels: int, allow_http: bool, **sampling) -> VideoFrames:
    """Decode the sampled frames of a video file / bytes / URL (decord, else PyAV)."""
    backend = _video_backend()
    data = read_source_bytes(source, allow_http=allow_http)
    if isinstance(data, bytes) and not data:
        raise ValueError("cannot decode: empty data (0 bytes)")
    if isinstance(data, Path) and data.stat().st_size == 0:
        raise ValueError("cannot decode: empty file (0 bytes)")
    read = _read_decord if backend == "decord" else _read_pyav
    frames, total, video_fps = read(data, max_pixels, sampling)
    return VideoFrames(
        torch.from_numpy(frames).permute(0, 3, 1, 2), len(frames) / total * video_fps
    )


def _check_size(count: int, height: int, width: int, max_pixels: int) -> None:
    if count * height * width > max_pixels:
        raise ValueError(
            f"{count} frames of {width}x{height} exceed the limit of {max_pixels} pixels"
        )


def _indices(total: int, video_fps: float, sampling: dict) -> torch.Tensor:
    """The frames to decode: a family's own `sampler(total, fps)` if given, else Qwen's rule."""
    sampler = sampling.get("sampler")
    if sampler is not None:
        return torch.as_tensor(sampler(total, video_fps), dtype=torch.int64)
    return sample_indices(total, video_fps, **sampling)


def _read_decord(data: bytes | Path, max_pixels: int, sampling: dict):
    """(sampled frames [T, H, W, 3] uint8, total frames, fps) with decord."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data) if isinstance(data, bytes) else str(data))
        total = len(reader)
        video_fps = float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError) as exc:
        raise ValueError(f"cannot decode video: {str(exc).splitlines()[0]}") from None
    if total == 0 or video_fps <= 0:
        raise ValueError(f"no decodable frames ({total} frames, {video_fps} fps)")
    indices = _indices(total, video_fps, sampling)
    _check_size(len(indices), *reader[0].shape[:2], max_pixels)
    try:
        return reader.get_batch(indices.tolist()).asnumpy(), total, video_fps
    except (decord.DECORDError, RuntimeError) as exc:
        raise ValueError(f"cannot decode frames: {str(exc).splitlines()[0]}") from None


def _read_pyav(data: bytes | Path, max_pixels: int, sampling: dict):
    """(sampled frames [T, H, W, 3] uint8, total frames, fps) with PyAV: the frames are counted
    from the demuxed packets (no decoding), then decoded in one pass keeping the sampled ones."""
    import av

    def open_video():
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data))
        if not container.streams.video:
            container.close()
            raise ValueError("cannot decode video: no video stream")
        return container, container.streams.video[0]

    try:
        container, stream = open_video()
        with container:
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else 0.0
            height, width = stream.codec_context.height, stream.codec_context.width
            total = sum(1 for packet in container.demux(stream) if packet.size)
        if total == 0 or video_fps <= 0:
            raise ValueError(f"no decodable frames ({total} frames, {video_fps} fps)")
        indices = _indices(total, video_fps, sampling).tolist()
        _check_size(len(indices), height, width, max_pixels)
        wanted, frames = set(indices), {}
        container, stream = open_video()
        with container:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot decode video: {exc}") from None
    if len(frames) < len(wanted):
        raise ValueError(f"cannot decode frames: the stream ended after {i + 1} of {total}")
    return np.stack([frames[i] for i in indices]), total, video_fps


def load_video(
    source: Any,
    *,
    index: int = 0,
    fps: float | None = None,
    num_frames: int | None = None,
    temporal_patch_size: int = 2,
    min_frames: int = 4,
    max_frames: int = 768,
    max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
    allow_http: bool = False,
    sampler=None,
) -> VideoFrames:
    """Load one video as `[T, 3, H, W]` frames; user errors raise `MediaError` naming the item.

    A file / bytes / URL is decoded with decord and sampled by `fps` (default 2) or
    `num_frames`, or by `sampler(total_frames, video_fps) -> indices` (a family's own rule;
    then `fps` / `num_frames` are ignored). A list of frames (or a `[T, H, W, C]` array) is
    taken as already sampled; `fps` is then the rate of those frames (default 24, as in
    transformers).
    """
    try:
        if isinstance(source, (str, Path, bytes, bytearray, memoryview)):
            if sampler is not None:
                return decode_video_file(
                    source, max_pixels=max_pixels, allow_http=allow_http, sampler=sampler
                )
            if fps is None and num_frames is None:
                fps = 2.0
            return decode_video_file(
                source,
                max_pixels=max_pixels,
                allow_http=allow_http,
                fps=fps,
                num_frames=num_frames,
                temporal_patch_size=temporal_patch_size,
                min_frames=min_frames,
                max_frames=max_frames,
            )
        if isinstance(source, dict) and "video_embeds" in source:
            raise ValueError(
                "video_embeds (a vision tower's output given in place of the video) are taken "
                "by Qwen2-VL / Qwen2.5-VL models; this model's processor takes videos"
            )
        frames = frames_from_list(source, max_pixels)
        return VideoFrames(frames, DEFAULT_FRAME_LIST_FPS if fps is None else float(fps))
    except ValueError as exc:
        raise media_error("video", index, source, str(exc)) from None
