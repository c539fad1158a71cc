"""Output types of the processors: what the engine and the encoders receive for one prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from polymodal.processors.qwen_vision import frames_to_pixel_values

# `data` keys of raw pixels (the processor's output, until the model stages it)
RAW_PIXEL_KEYS = ("pixel_frames", "pixel_mean", "pixel_std", "patch_layout")


@dataclass
class MultimodalItem:
    """One image or video of a prompt, preprocessed for its encoder.

    `data` holds the encoder inputs: `grid_thw` int64 `[1, 3]` (temporal, height, width in
    patches) and the pixels. From the processor they are neither patchified nor normalized
    (no copy and no float work on the host, 4x+ fewer bytes to copy): `pixel_frames` uint8
    `[T, C, H, W]`, resized (float32 for alpha-blended video; any strides, e.g. a view of the
    decoded HWC image), `pixel_mean` / `pixel_std` float32 `[C]` (scaled by 1/rescale) and
    `patch_layout` int64 `[4]`: (t_patch, patch, merge, repeat), see `resize_for_patches`.
    `pixel_values()` patchifies and normalizes them; the model's `stage()` replaces them with
    `pixel_values` `[num_patches, patch_dim]` made on its device, in its dtype. The encoder's
    output rows `[num_slots, hidden]` go to `token_ids[slot_start : slot_start + num_slots]`.
    """

    modality: str  # "image" | "video"
    data: dict[str, torch.Tensor]
    slot_start: int
    num_slots: int
    content_hash: str
    # Seconds covered by one temporal grid step (temporal_patch_size / sampled fps); videos only.
    second_per_grid: float | None = None

    def pixel_values(
        self,
        dtype: torch.dtype = torch.float32,
        move: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Normalized pixel values `[num_patches, patch_dim]` in `dtype`.

        `move` (e.g. a pinned async copy to the device) is applied to the frames first, so
        patchifying and normalizing run where they land (mean/std stay host values); already
        normalized `pixel_values` are cast first, then moved.
        """
        data, move = self.data, move or (lambda tensor: tensor)
        if "pixel_frames" not in data:
            return move(data["pixel_values"].to(dtype))
        frames, mean, std = move(data["pixel_frames"]), data["pixel_mean"], data["pixel_std"]
        return frames_to_pixel_values(frames, mean, std, data["patch_layout"].tolist(), dtype)

    def set_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Keep `pixel_values` (normalized, e.g. staged on the device) instead of the frames."""
        data = {k: v for k, v in self.data.items() if k not in RAW_PIXEL_KEYS}
        data["pixel_values"] = pixel_values
        self.data = data  # one swap: a reader sees the old dict or the new one

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
