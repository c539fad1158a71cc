"""What a repeated image or video costs the host, and why it stays content-safe: large inputs
are hashed on all cores with the single-threaded digest; a frame list is copied once into one
buffer that shares no memory with the caller's frames, so changing a frame in place changes
the content hash."""

from __future__ import annotations

import blake3
import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.processors import hashing
from polymodal.processors.hashing import content_hash
from polymodal.processors.video import frames_from_list, frames_to_rgb


def _reference_hash(modality: str, tensors: dict[str, torch.Tensor]) -> str:
    """The digest as a single thread computes it (the cache keys before multithreading)."""
    digest = blake3.blake3()
    digest.update(modality.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
    return digest.hexdigest()


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_multithreaded_hash_equals_the_single_threaded_digest(monkeypatch, threshold):
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (6, 720, 1280, 3), dtype=np.uint8))
    tensors = {"frames": frames.permute(0, 3, 1, 2), "knobs": torch.arange(5.0).double()}
    assert frames.numel() >= hashing.MULTITHREAD_BYTES  # the multithreaded path by default
    monkeypatch.setattr(hashing, "MULTITHREAD_BYTES", threshold)
    assert content_hash("video", tensors) == _reference_hash("video", tensors)
    small = {"frames": frames[0, :8]}
    assert content_hash("image", small) == _reference_hash("image", small)


def _old_frames_from_list(frames) -> torch.Tensor:
    """The previous conversion (an array per frame, then np.stack): the result to keep."""
    arrays = []
    for frame in frames:
        if isinstance(frame, Image.Image):
            frame = np.array(frame if frame.mode in ("RGB", "RGBA", "L") else frame.convert("RGB"))
        elif isinstance(frame, torch.Tensor):
            frame = frame.permute(1, 2, 0).numpy() if frame.shape[0] in (1, 3, 4) else frame
        arrays.append(frame[..., None] if frame.ndim == 2 else frame)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", ["RGB", "RGBA", "L", "P", "array", "gray_array", "chw_tensor"])
def test_frame_list_conversion_is_unchanged(kind):
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (30, 44, 4), dtype=np.uint8) for _ in range(3)]
    pixels[1][..., 3] = 255  # one opaque RGBA frame among blended ones
    make = {
        "RGB": lambda p: Image.fromarray(p[..., :3]),
        "RGBA": lambda p: Image.fromarray(p),
        "L": lambda p: Image.fromarray(p[..., 0]),
        "P": lambda p: Image.fromarray(p[..., :3]).convert("P"),
        "array": lambda p: p[..., :3],
        "gray_array": lambda p: p[..., 0],
        "chw_tensor": lambda p: torch.from_numpy(p[..., :3]).permute(2, 0, 1),
    }[kind]
    frames = [make(p) for p in pixels]
    expected = frames_to_rgb(_old_frames_from_list(frames))
    assert torch.equal(frames_from_list(frames, 10**9), expected)


def test_frame_list_shares_no_memory_with_the_callers_frames():
    rng = np.random.default_rng(2)
    stacked = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    for frames in (stacked, list(stacked), torch.from_numpy(stacked)):
        video = frames_from_list(frames, 10**9)
        before = video.clone()
        stacked[2, 5, 5] ^= 0xFF  # the caller changes a frame in place afterwards
        assert torch.equal(video, before)


def test_frame_list_errors_name_the_problem():
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="one shape"):
        frames_from_list([frame, np.zeros((8, 9, 3), dtype=np.uint8)], 10**9)
    with pytest.raises(ValueError, match="exceed the limit"):
        frames_from_list([frame] * 3, 3 * 64 - 1)
    with pytest.raises(ValueError, match="uint8"):
        frames_from_list([frame.astype(np.float32)], 10**9)
    with pytest.raises(ValueError, match="HxW or HxWxC"):
        frames_from_list([np.zeros(8, dtype=np.uint8)], 10**9)
