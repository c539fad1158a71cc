"""Processed-input cache: a repeated image or video (the same bytes, the same options) skips
decoding, resizing and hashing.

The key is BLAKE3 of the item's raw bytes (a file's content, a data: URL's payload, bytes
given directly; a PIL image's pixel memory, read in place: `hashing.image_key`) plus the
options that shape its preprocessing; the value is the processed item (resized uint8 frames,
grid, content hash). A hit returns a shallow copy: the tensors are shared read-only, the item's
own fields (slots, staged data) are not. Sources without such bytes (arrays, tensors; a PIL
image Pillow cannot export in place: a palette, several memory blocks) are not cached here:
their content hash is taken on the decoded pixels, and the prefix cache still skips the tower
for them. Frame lists are keyed by their processor (`video.frames_key`).

Entries are bounded by the bytes of their tensors, least recently used out first; lookups and
inserts are thread-safe (media is processed on worker threads).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from polymodal.processors.hashing import hasher, image_key
from polymodal.processors.media import read_source_bytes

DEFAULT_MAX_MB = 2048


def raw_media_key(source: Any, allow_http: bool = False) -> str | None:
    """BLAKE3 (hex) of `source`'s raw bytes (a PIL image: its pixels, `image_key`), or None
    when it has none (arrays, frame lists) or cannot be read (the loader then reports the
    error, naming the item)."""
    if isinstance(source, Image.Image):
        return image_key(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data: bytes | Path = bytes(source)
    elif isinstance(source, (str, Path)):
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            return None  # fetched once by the loader; never twice
        try:
            data = read_source_bytes(source, allow_http=allow_http)
        except (ValueError, OSError):
            return None
    else:
        return None
    try:  # one thread below `MULTITHREAD_BYTES`: a 448 px JPEG's ~50 KB took 67 us on the
        # Rayon pool against 20 on one thread (2-core box), and a burst's media threads share it
        if isinstance(data, Path):
            digest = hasher(data.stat().st_size)
            digest.update_mmap(data)
        else:
            digest = hasher(len(data))
            digest.update(data)
    except OSError:
        return None
    return digest.hexdigest()


def copy_item(value: Any, drop: tuple[str, ...] = ()) -> Any:
    """A copy of a cached value that shares its tensors: a `MultimodalItem` (its `data` dict
    copied, less the keys in `drop`), or a value with its own `copy()` (`drop` unused)."""
    if hasattr(value, "copy"):
        return value.copy()
    data = {name: t for name, t in value.data.items() if name not in drop}
    return dataclasses.replace(value, data=data)


class ProcessedInputCache:
    """LRU of processed media items, bounded by their tensors' bytes."""

    def __init__(self, max_mb: float = DEFAULT_MAX_MB) -> None:
        self.max_bytes = int(max_mb * (1 << 20))
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> Any | None:
        """A copy of the item cached under `key` (its tensors shared), else None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return copy_item(entry[0])

    def put(self, key: tuple, item: Any) -> None:
        """Keep a copy of `item` (an unstaged processed item) under `key`, evicting the least
        recently used entries past the byte bound; an item larger than the bound is not kept."""
        nbytes = sum(t.numel() * t.element_size() for t in item.data.values())
        if nbytes > self.max_bytes:
            return
        kept = copy_item(item)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (kept, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size

    def __len__(self) -> int:
        return len(self._items)
