"""Load one image from whatever a user hands us, bounded and with errors that name the item.

Sources: a file path (`str`/`Path`, `file://`), raw bytes, a `data:` URL, an `http(s)://` URL
(only with `allow_http=True`), a PIL image, a numpy array (HW or HWC uint8) or a torch tensor
(CHW or HWC uint8). The result is always a decoded PIL image in mode RGB, converted the way
transformers' Qwen2-VL image processor converts it (`PIL.Image.convert("RGB")`, which drops
alpha rather than blending it), after EXIF orientation has been applied.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from polymodal.llm_core.errors import MediaError

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # decoded width * height; checked from the header


def describe_source(source: Any) -> str:
    """A short, log-safe description of a media source for error messages."""
    if isinstance(source, Path):
        return repr(source.name)
    if isinstance(source, str):
        if source.startswith("data:"):
            return repr(source[:30] + f"... ({len(source)} chars)")
        text = source if len(source) <= 80 else "..." + source[-77:]
        return repr(os.path.basename(text) if "://" not in text else text)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"<{type(source).__name__} {tuple(source.shape)} {source.dtype}>"
    if isinstance(source, tuple) and len(source) == 2:  # (audio array, sampling rate)
        return f"{describe_source(source[0])[:-1]} at {source[1]!r} Hz>"
    if isinstance(source, dict) and "sampling_rate" in source:  # transformers' audio dict
        array = source.get("array", source.get("raw"))
        return f"{describe_source(array)[:-1]} at {source['sampling_rate']!r} Hz>"
    return f"<{type(source).__name__}>"


def media_error(kind: str, index: int, source: Any, reason: str) -> MediaError:
    """`MediaError("image 2 ('foo.png'): <reason>")`; `index` is 0-based, printed 1-based."""
    return MediaError(f"{kind} {index + 1} ({describe_source(source)}): {reason}")


class _LastDataUrl(threading.local):
    """The last base64 data: URL this thread decoded (the string object itself) and its bytes:
    a request's media is read twice on one thread, for the processed-input cache's key and by
    the loader, and a 448 px JPEG's base64 took ~160 us to decode (CPU box), GIL held. Kept
    until the thread decodes another (`MEMO_DATA_URL_BYTES` at most)."""

    source: str | None = None
    data: bytes = b""


_LAST_DATA_URL = _LastDataUrl()
MEMO_DATA_URL_BYTES = 16 << 20  # larger payloads (videos) are not kept past their call


def read_source_bytes(source: str | Path | bytes, *, allow_http: bool = False) -> bytes | Path:
    """Resolve a path / URL / bytes source to bytes or an existing file path (raises ValueError)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Path):
        if not source.is_file():
            raise ValueError(f"no such file: {str(source)!r}")
        return source
    if source.startswith("data:"):
        if _LAST_DATA_URL.source is source:  # the cache key's read, then the loader's
            return _LAST_DATA_URL.data
        # data:[<mediatype>][;base64],<data>
        header, sep, payload = source.partition(",")
        if not sep:
            raise ValueError("malformed data: URL (no ',')")
        if not header.endswith(";base64"):
            return urllib.parse.unquote_to_bytes(payload)
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"malformed base64 in data: URL ({exc})") from None
        if len(data) <= MEMO_DATA_URL_BYTES:
            _LAST_DATA_URL.source, _LAST_DATA_URL.data = source, data
        return data
    if source.startswith(("http://", "https://")):
        if not allow_http:
            raise ValueError("http(s) URLs are not fetched unless allow_http=True is passed")
        try:
            with urllib.request.urlopen(source, timeout=30) as response:  # noqa: S310 (opt-in)
                return response.read()
        except OSError as exc:  # refused, unreachable, timed out, an HTTP error status
            raise ValueError(f"cannot fetch the URL: {exc}") from None
    if source.startswith("file://"):
        source = urllib.parse.unquote(source[len("file://") :])
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"no such file: {source!r}")
    return path


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """HW / HWC uint8 array -> PIL image (L, RGB or RGBA)."""
    if array.dtype != np.uint8:
        raise ValueError(f"arrays must be uint8 with values 0..255, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(
            np.ascontiguousarray(array), mode="RGB" if array.shape[-1] == 3 else "RGBA"
        )
    raise ValueError(f"arrays must be HW or HWC with 1, 3 or 4 channels, got shape {array.shape}")


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """CHW or HWC uint8 tensor -> HWC numpy array (CHW wins when both readings fit)."""
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)
    return tensor.numpy()


def _open_checked(data: bytes | Path, max_pixels: int) -> Image.Image:
    """Open and decode an encoded image, checking its size from the header before decoding."""
    with warnings.catch_warnings():
        # We enforce our own limit below; PIL's bomb check is a warning up to 2x its own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        except Image.DecompressionBombError as exc:
            # PIL refused from the header alone (> 2x its own limit); keep its pixel count
            found = re.search(r"\((\d+) pixels\)", str(exc))
            count = found.group(1) if found else "too many"
            raise ValueError(f"{count} pixels exceeds the limit of {max_pixels}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot decode: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise ValueError(f"empty image ({width}x{height})")
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
        raise ValueError(f"cannot decode: {exc}") from None
    return image


ORIENTATION_TAG = 0x0112  # EXIF Orientation


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, then convert to RGB as transformers' `convert_to_rgb` does
    (5.24): transparency (an alpha band, or a palette's transparent colour) is composited onto
    white, every other mode converts as PIL converts it. (transformers up to 5.17 dropped the
    alpha instead: docs/models.md.)"""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image is empty ({image.width}x{image.height})")
    try:
        if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # (else exif_transpose only copies)
            image = ImageOps.exif_transpose(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot read the {image.mode} image as RGB: {exc}") from None


# Pillow's memory block for images allocated from now on (its default, 16 MiB, holds a 4K RGB
# image, 33 MB as RGBX, in three blocks, which its Arrow export cannot view in place:
# `hashing.pixel_view`). Images up to 64 megapixels then take one block; only the allocation's
# granularity changes (Pillow allocates what an image needs, in fewer pieces).
IMAGE_BLOCK_BYTES = 256 << 20


def hold_images_in_one_block() -> None:
    """Raise Pillow's memory block to `IMAGE_BLOCK_BYTES` (process-wide, for images allocated
    afterwards: the ones the processors decode, and a caller's made after a processor exists)."""
    core = Image.core
    if hasattr(core, "set_block_size") and core.get_block_size() < IMAGE_BLOCK_BYTES:
        core.set_block_size(IMAGE_BLOCK_BYTES)


def load_image(
    source: Any,
    *,
    index: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_http: bool = False,
) -> Image.Image:
    """Load `source` as a decoded RGB PIL image; user errors raise `MediaError` naming the item.

    `index` (0-based) is the item's position among the request's images, used in messages;
    `max_pixels` bounds width * height and is checked before any pixel is decoded.
    """
    hold_images_in_one_block()
    try:
        if isinstance(source, Image.Image):
            if source.width * source.height > max_pixels:
                raise ValueError(
                    f"{source.width}x{source.height} exceeds the limit of {max_pixels}"
                )
            return to_rgb(source)
        if isinstance(source, torch.Tensor):
            source = _tensor_to_array(source)
        if isinstance(source, np.ndarray):
            if source.ndim >= 2 and source.shape[0] * source.shape[1] > max_pixels:
                raise ValueError(
                    f"{source.shape[1]}x{source.shape[0]} exceeds the limit of {max_pixels}"
                )
            return to_rgb(_array_to_pil(source))
        if isinstance(source, (str, Path, bytes, bytearray, memoryview)):
            data = read_source_bytes(source, allow_http=allow_http)
            if isinstance(data, bytes) and not data:
                raise ValueError("cannot decode: empty data (0 bytes)")
            if isinstance(data, Path) and data.stat().st_size == 0:
                raise ValueError("cannot decode: empty file (0 bytes)")
            return to_rgb(_open_checked(data, max_pixels))
        if isinstance(source, dict) and "image_embeds" in source:
            raise ValueError(
                "image_embeds with a grid (a vision tower's output given in place of the "
                "image) are taken by Qwen2-VL / Qwen2.5-VL models; this model's processor "
                "takes images (LLaVA-1.5, LLaVA-NeXT and Gemma 3 also take the rows alone)"
            )
        raise ValueError(
            f"unsupported image type {type(source).__name__}; pass a path, bytes, data: URL, "
            "PIL image, numpy array or torch tensor"
        )
    except ValueError as exc:
        raise media_error("image", index, source, str(exc)) from None
