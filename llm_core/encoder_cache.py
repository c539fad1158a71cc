"""Encoder outputs cached by media content hash (bounded LRU).

Chunked prefill reads an item's embeddings in slices across steps, and the same image in
another request (or turn) reuses them without running the tower again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """LRU of encoder outputs `[num_slots, hidden]` keyed by media content hash."""

    def __init__(self, max_items: int = 256):
        self.max_items = max_items
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self.misses += 1
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_items:
            self.entries.popitem(last=False)
