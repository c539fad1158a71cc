"""Encoder outputs cached by media content hash: an LRU bounded in bytes.

Chunked prefill reads an item's embeddings in slices across steps, and the same image in
another request (or turn) reuses them without running the tower again. The bound is in bytes
(`max_bytes`, set by the engine from `EngineConfig.encoder_cache_mb` and taken out of the KV
cache's share of device memory), so a model with a wide hidden size or large images cannot
grow it past what was budgeted. The entry just stored is never evicted by its own `put` (an
item larger than the whole cache still serves the step that made it).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def tensor_bytes(value) -> int:
    """Device bytes of an encoder output: a tensor, or a tuple / list / dict of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class EncoderCache:
    """LRU of encoder outputs (`[num_embeds, hidden]`, or what a family's encoder returns)
    keyed by media content hash, holding at most `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.sizes: dict[str, int] = {}
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        """Drop every entry (the encoder's weights changed)."""
        self.entries.clear()
        self.sizes.clear()
        self.num_bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self.misses += 1
        if key in self.entries:
            self.num_bytes -= self.sizes[key]
        size = tensor_bytes(value)
        self.entries[key] = value
        self.entries.move_to_end(key)
        self.sizes[key] = size
        self.num_bytes += size
        while self.num_bytes > self.max_bytes and len(self.entries) > 1:
            old, _ = self.entries.popitem(last=False)
            self.num_bytes -= self.sizes.pop(old)
            self.evictions += 1
