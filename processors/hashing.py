"""Content hashes of preprocessed media: the key of the encoder cache and of prefix-cache blocks."""

from __future__ import annotations

import ctypes

import blake3
import numpy as np
import torch
from PIL import Image

from polymodal.processors.media import ORIENTATION_TAG


def content_hash(modality: str, tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE3 (256-bit, hex) over the modality and each tensor's name, dtype, shape and bytes.

    BLAKE3 is collision-resistant, so one user's media cannot be made to share another's cached
    blocks, and ~4x faster than SHA-256 (a decoded 448x448 image: 0.07 vs 0.31 ms on the CPU
    box), which is time to first token.

    Hashing the *processed* tensors means two requests share a hash exactly when the encoder
    would see the same input (same pixels after resize, same grid), whatever the source format.
    Inputs of `MULTITHREAD_BYTES` or more are hashed on all cores (`hasher`): the same digest.
    """
    parts = {name: tensors[name].detach().cpu() for name in sorted(tensors)}
    digest = hasher(sum(t.numel() * t.element_size() for t in parts.values()))
    digest.update(modality.encode())
    for name, tensor in parts.items():
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(row_major_bytes(tensor))
    return digest.hexdigest()


# BLAKE3's tree splits an input over threads with the same digest as one thread; below a few
# MiB the thread pool costs more than it saves (64 frames of 720p, 177 MB: 44 ms on one core)
MULTITHREAD_BYTES = 4 << 20


def hasher(num_bytes: int) -> blake3.blake3:
    """A BLAKE3 hasher for about `num_bytes` of input: multithreaded (Rayon, every core) for
    large inputs, single-threaded for small ones. Both give the same digest."""
    if num_bytes >= MULTITHREAD_BYTES:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


# dtypes numpy holds (not bfloat16 or the float8s)
NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.float32, torch.float64}  # fmt: skip


def row_major_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements in row-major order as a uint8 array (no copy when contiguous).
    A permuted view (an HWC image seen as CHW) is laid out by numpy: torch's strided uint8
    copy on the CPU took 15-20 ms for a 448x448 image here, numpy's well under 1 ms."""
    if tensor.is_contiguous() or tensor.dtype not in NUMPY_DTYPES:
        return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)


# ---- a PIL image's pixels without a copy ------------------------------------------------
# Pillow (>= 11.2) exports an image held in one memory block through the Arrow C data
# interface: an `ArrowArray` whose (last) data buffer is the image's own pixel memory. Reading
# it costs nothing, where `np.asarray(image)` copies every byte through `tobytes` (2-3 ms for
# a 1080p image on an H200's host; 64 frames of 720p ~70 ms): a repeated image's or frame
# list's key is then one hash. Modes whose pixels alone do not say what the image is (a
# palette, a transparency key in `info`) have no view.
PIXEL_VIEW_MODES = ("RGB", "RGBA", "L")
# Pillow's default memory block: a larger image is held in several and cannot be exported
PIXEL_VIEW_BYTES = 16 << 20


class _ArrowArray(ctypes.Structure):
    """struct ArrowArray (https://arrow.apache.org/docs/format/CDataInterface.html)."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def hash_pixels(digest: blake3.blake3, image: Image.Image, tag: bytes = b"") -> bool:
    """Feed `tag`, then `image`'s pixel memory to `digest` as Pillow holds it (RGB as RGBX, 4
    bytes a pixel), without copying it; False (nothing fed) when Pillow cannot export it so (an
    image over `PIXEL_VIEW_BYTES`, e.g. 4K RGB: several memory blocks; an old Pillow; a mode
    outside `PIXEL_VIEW_MODES`; pixels Pillow does not own: `readonly`). An image not yet
    decoded (`Image.open`) is decoded here: the size bound keeps that far below any
    processor's pixel limit."""
    if image.mode not in PIXEL_VIEW_MODES or "transparency" in image.info:
        return False
    if not 0 < image.width * image.height * 4 <= PIXEL_VIEW_BYTES:  # (empty: the export crashes)
        return False
    export = getattr(image, "__arrow_c_array__", None)
    if export is None:
        return False
    try:
        image.load()
        # pixels in a caller's buffer (`fromarray` of L / RGBA, `frombuffer`, a memory-mapped
        # file once loaded): Pillow 12.3's export dereferences blocks those do not have
        if image.readonly:
            return False
        _schema, capsule = export()
    except (ValueError, OSError):
        return False
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    while array.n_children:  # RGB / RGBA: a fixed-size list of 4 uint8 over one child
        array = array.children[0].contents
    size = image.width * image.height * (1 if image.mode == "L" else 4)  # uint8 elements
    if array.n_buffers != 2 or not array.buffers[1] or array.length != size:
        return False
    pixels = (ctypes.c_char * size).from_address(array.buffers[1] + array.offset)
    digest.update(tag)
    digest.update(memoryview(pixels).cast("B"))  # the capsule (held here) keeps the memory alive
    return True


def image_key(image: Image.Image) -> str | None:
    """BLAKE3 (hex) of a PIL image's mode, size, EXIF orientation and pixels (`hash_pixels`:
    no copy), or None when it has no such view. Two images with one key load alike."""
    digest = hasher(image.width * image.height * 4)
    orientation = image.getexif().get(ORIENTATION_TAG, 1)  # loaders apply it
    digest.update(f"pixels|{image.mode}|{image.width}x{image.height}|{orientation}|".encode())
    return digest.hexdigest() if hash_pixels(digest, image) else None
