"""Output types of the processors: what the engine and the encoders receive for one prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MultimodalItem:
    """One image or video of a prompt, preprocessed for its encoder.

    `data` holds the encoder inputs: `pixel_values` float32 `[num_patches, patch_dim]` and
    `grid_thw` int64 `[1, 3]` (temporal, height, width in patches). The encoder's output rows
    `[num_slots, hidden]` go to `token_ids[slot_start : slot_start + num_slots]`.
    """

    modality: str  # "image" | "video"
    data: dict[str, torch.Tensor]
    slot_start: int
    num_slots: int
    content_hash: str
    # Seconds covered by one temporal grid step (temporal_patch_size / sampled fps); videos only.
    second_per_grid: float | None = None

    @property
    def slot_range(self) -> range:
        """Indices in `token_ids` of this item's slot tokens."""
        return range(self.slot_start, self.slot_start + self.num_slots)


@dataclass
class ProcessedPrompt:
    """A prompt ready for the engine: token ids, M-RoPE positions and its media items.

    `positions` is `[3][num_tokens]` (temporal, height, width rows) for M-RoPE models, `None`
    for 1-D rotary. Decode step `i` (0-based, after the prompt) sits at position
    `len(token_ids) + i + mrope_delta` in all three rows.
    """

    token_ids: list[int]
    positions: list[list[int]] | None
    mrope_delta: int
    mm_items: list[MultimodalItem] = field(default_factory=list)
