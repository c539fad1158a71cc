"""Content hashes of preprocessed media: the key of the encoder cache and of prefix-cache blocks."""

from __future__ import annotations

import ctypes
import os

import blake3
import numpy as np
import torch
from PIL import Image

from polymodal.processors.media import IMAGE_BLOCK_BYTES, ORIENTATION_TAG


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
# a 1080p image on an H200's host; a 4K image ~35 ms, 64 frames of 720p ~90 ms): a repeated
# image's or frame list's key is then one hash, and the processors read a fresh image's pixels
# from there (`pixel_view`). Modes whose pixels alone do not say what the image is (a palette,
# a transparency key in `info`) have no view.
PIXEL_VIEW_MODES = ("RGB", "RGBA", "L")
# Pillow holds an image larger than its memory block in several blocks, which it cannot export
# (`media.hold_images_in_one_block` raises the block to this once a processor exists or loads
# an image)
PIXEL_VIEW_BLOCK_BYTES = IMAGE_BLOCK_BYTES
# An image not yet decoded (`Image.open`) is decoded for its view only up to this size: far
# below any processor's pixel limit, which `load_image` checks before it decodes larger ones
PIXEL_VIEW_DECODE_BYTES = 16 << 20
# False (or POLYMODAL_PIXEL_VIEWS=0 in the environment, e.g. of a server process): `rgbx_view`
# declines and the processors copy, as before (A/B runs)
USE_PIXEL_VIEWS = True


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


def _exported_pixels(image: Image.Image):
    """`image`'s pixel memory as Pillow holds it (RGB as RGBX, 4 bytes a pixel), a ctypes
    char array over it that holds the Arrow capsule (which keeps the memory alive), or None
    where Pillow cannot export it so: several memory blocks (an image allocated before this
    module loaded, or over `PIXEL_VIEW_BLOCK_BYTES`), an old Pillow, a mode outside
    `PIXEL_VIEW_MODES`, pixels Pillow does not own (`readonly`). An image not yet decoded
    (`Image.open`) is decoded here up to `PIXEL_VIEW_DECODE_BYTES`."""
    if image.mode not in PIXEL_VIEW_MODES or "transparency" in image.info:
        return None
    nbytes = image.width * image.height * 4
    decoded = getattr(image, "_im", True) is not None  # (an older Pillow: decoded or not)
    if not 0 < nbytes <= (PIXEL_VIEW_BLOCK_BYTES if decoded else PIXEL_VIEW_DECODE_BYTES):
        return None  # (empty: the export crashes)
    export = getattr(image, "__arrow_c_array__", None)
    if export is None:
        return None
    try:
        image.load()
        # pixels in a caller's buffer (`fromarray` of L / RGBA, `frombuffer`, a memory-mapped
        # file once loaded): Pillow 12.3's export dereferences blocks those do not have
        if image.readonly:
            return None
        _schema, capsule = export()  # ValueError: several blocks
    except (ValueError, OSError):
        return None
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    while array.n_children:  # RGB / RGBA: a fixed-size list of 4 uint8 over one child
        array = array.children[0].contents
    size = image.width * image.height * (1 if image.mode == "L" else 4)  # uint8 elements
    if array.n_buffers != 2 or not array.buffers[1] or array.length != size:
        return None
    pixels = (ctypes.c_char * size).from_address(array.buffers[1] + array.offset)
    pixels.capsule = capsule  # released (and the memory with it) when the view is dropped
    return pixels


def hash_pixels(digest: blake3.blake3, image: Image.Image, tag: bytes = b"") -> bool:
    """Feed `tag`, then `image`'s pixel memory to `digest` as Pillow holds it (RGB as RGBX),
    without copying it; False (nothing fed) where `_exported_pixels` has no view."""
    pixels = _exported_pixels(image)
    if pixels is None:
        return False
    digest.update(tag)
    digest.update(memoryview(pixels).cast("B"))
    return True


def rgbx_view(image: Image.Image) -> np.ndarray | None:
    """An RGB image's memory as Pillow holds it, `[H, W, 4]` uint8 (RGB and a pad byte a
    pixel), viewed without a copy, or None (another mode, or no export: `np.asarray` then
    copies). The view keeps the memory alive; writes to the image show through it."""
    if not USE_PIXEL_VIEWS or os.environ.get("POLYMODAL_PIXEL_VIEWS") == "0":
        return None
    if image.mode != "RGB":
        return None
    pixels = _exported_pixels(image)
    if pixels is None:
        return None
    return np.frombuffer(pixels, np.uint8).reshape(image.height, image.width, 4)


def pixel_view(image: Image.Image) -> np.ndarray | None:
    """An RGB image's pixels `[H, W, 3]` uint8 as a view of Pillow's own memory (`rgbx_view`
    less the pad byte: strides (4W, 4, 1)), or None."""
    view = rgbx_view(image)
    return None if view is None else view[:, :, :3]


def image_key(image: Image.Image) -> str | None:
    """BLAKE3 (hex) of a PIL image's mode, size, EXIF orientation and pixels (`hash_pixels`:
    no copy), or None when it has no such view. Two images with one key load alike."""
    digest = hasher(image.width * image.height * 4)
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)  # loaders apply it
    except (ValueError, OSError):  # closed, truncated: the loader names the error
        return None
    digest.update(f"pixels|{image.mode}|{image.width}x{image.height}|{orientation}|".encode())
    return digest.hexdigest() if hash_pixels(digest, image) else None


def views_image(tensor: torch.Tensor | None, image: Image.Image) -> bool:
    """Whether `tensor` views `image`'s own pixel memory (`rgbx_view`: its first byte's)."""
    view = rgbx_view(image) if tensor is not None else None
    return view is not None and tensor.data_ptr() == view.ctypes.data
