"""Output types of the processors: what the engine and the encoders receive for one prompt.

The types are modality- and family-neutral: a `MultimodalItem` says where its embeddings go
(slot positions in the token stream, or cross-attention states) and carries its encoder's
inputs in `data`, whose keys are the family's business (Qwen: `grid_thw`; LLaVA-NeXT:
`image_size`; ...). Pixels stay raw (resized uint8) until `stage()` turns them into
`pixel_values` on the model's device with the recipe the processor attached (`pixel_fn`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# `data` keys of raw pixels (the processor's output, until the item is staged)
RAW_PIXEL_KEYS = ("pixel_frames", "pixel_mean", "pixel_std", "patch_layout")
# where an item's embeddings go
SLOTS = "slots"  # rows replace the embeddings of its slot tokens
CROSS_ATTENTION = "cross_attention"  # states the decoder's cross-attention layers read
# the modality of a prompt given as embeddings (vLLM's `prompt_embeds`): its rows are
# `data["embeds"]` as given, no encoder runs (llm_core/prompt_embeds.py)
PROMPT_EMBEDS = "prompt_embeds"

# `pixel_fn(frames, mean, std, dtype=...) -> pixel_values`: the family's normalization of raw
# frames, run wherever the frames are (host, or the device after staging)
PixelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


@dataclass
class MultimodalItem:
    """One media item (an image, a video, an audio clip) of a prompt, preprocessed for its encoder.

    Span: `token_ids[slot_start : slot_start + num_slots]`. With `target == SLOTS` the
    encoder's output rows `[num_embeds, hidden]` replace the embeddings of the span's positions
    where `embed_mask` is true (all of them when it is None), in order; positions where it is
    false keep their token's embedding (Pixtral's `[IMG_BREAK]`, Llama 4's tile separators,
    Gemma 3's text between pan-and-scan crops). With `target == CROSS_ATTENTION` the output,
    `[encoder_rows, hidden]`, is read by cross-attention layers (its K/V written once per
    request into the cross KV cache) and the span marks the item's placeholder token(s), if any.

    `data` holds the encoder's inputs. From the processor the pixels are raw (no float work on
    the host, 4x+ fewer bytes to copy): `pixel_frames` (resized uint8 `[N, C, H, W]`, any
    strides; float32 for alpha-blended video) with `pixel_mean` / `pixel_std` (float32 `[C]`,
    scaled by 1 / rescale) and `pixel_fn`, the family's recipe that makes `pixel_values` of
    them. `stage()` replaces them with `pixel_values` made on a device in a dtype;
    `pixel_values()` makes them anywhere.
    """

    modality: str  # "image" | "video" | "audio" | PROMPT_EMBEDS
    data: dict[str, torch.Tensor]
    slot_start: int
    num_slots: int
    content_hash: str
    embed_mask: torch.Tensor | None = None  # bool [num_slots]; None: every position
    target: str = SLOTS
    pixel_fn: PixelFn | None = field(default=None, repr=False)
    encoder_rows: int = 0  # CROSS_ATTENTION: rows its encoder output has

    @property
    def slot_range(self) -> range:
        """Indices in `token_ids` of this item's span."""
        return range(self.slot_start, self.slot_start + self.num_slots)

    @property
    def slot_end(self) -> int:
        return self.slot_start + self.num_slots

    @property
    def num_embeds(self) -> int:
        """Rows the encoder gives for this item (slot positions it fills; cross-attention: its
        encoder rows)."""
        if self.target == CROSS_ATTENTION:
            return self.encoder_rows
        if self.embed_mask is None:
            return self.num_slots
        return int(self.embed_mask.sum())

    def embed_rows(self, lo: int, hi: int) -> tuple[list[int], int, int]:
        """For span offsets `[lo, hi)`: the offsets that take an embedding and the encoder rows
        `[first, last)` they take, in order."""
        if self.embed_mask is None:
            return list(range(lo, hi)), lo, hi
        before = int(self.embed_mask[:lo].sum())
        offsets = (torch.nonzero(self.embed_mask[lo:hi]).flatten() + lo).tolist()
        return offsets, before, before + len(offsets)

    def embed_runs(self) -> list[tuple[int, int]]:
        """Maximal runs `[start, end)` of embedded positions (absolute token indices): one run
        per crop or tile an image brings (Gemma 3's bidirectional groups)."""
        if self.target == CROSS_ATTENTION or self.modality == PROMPT_EMBEDS:
            return []  # a prompt given as embeddings is text to the model: causal
        if self.embed_mask is None:
            return [(self.slot_start, self.slot_end)] if self.num_slots else []
        mask = self.embed_mask.to(torch.int8)
        edges = torch.diff(torch.nn.functional.pad(mask, (1, 1))).tolist()
        starts = [i for i, e in enumerate(edges) if e == 1]
        ends = [i for i, e in enumerate(edges) if e == -1]
        return [(self.slot_start + a, self.slot_start + b) for a, b in zip(starts, ends)]

    def pixel_values(
        self,
        dtype: torch.dtype = torch.float32,
        move: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Normalized pixel values in `dtype` (shape as the family's encoder takes them).

        `move` (e.g. a pinned async copy to the device) is applied to the frames first, so the
        float work runs where they land (mean/std stay host values); already normalized
        `pixel_values` are cast first, then moved.
        """
        data, move = self.data, move or (lambda tensor: tensor)
        if "pixel_frames" not in data:
            return move(data["pixel_values"].to(dtype))
        if self.pixel_fn is None:
            raise ValueError(f"{self.modality} item has raw pixel_frames but no pixel_fn")
        frames = move(data["pixel_frames"])
        return self.pixel_fn(frames, data["pixel_mean"], data["pixel_std"], dtype=dtype)

    def set_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Keep `pixel_values` (normalized, e.g. staged on the device) instead of the frames."""
        data = {k: v for k, v in self.data.items() if k not in RAW_PIXEL_KEYS}
        data["pixel_values"] = pixel_values
        self.data = data  # one swap: a reader sees the old dict or the new one

    def stage(
        self,
        device: torch.device,
        dtype: torch.dtype,
        move: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Make `pixel_values` on `device` in `dtype` (idempotent; safe on a worker thread).

        `move` copies a tensor to `device` (the engine passes a pinned asynchronous copy);
        given embeddings (`data["embeds"]`: a prompt's, an image's) are moved and cast.
        """
        data = self.data
        if "embeds" in data:  # given rows (a prompt's, an image's): moved and cast as they are
            rows = data["embeds"]
            if rows.device != torch.device(device) or rows.dtype != dtype:
                rows = (move or (lambda t: t.to(device)))(rows).to(dtype)
                self.data = {**data, "embeds": rows}
            return
        if "pixel_frames" not in data and "pixel_values" not in data:
            return
        pixels = data.get("pixel_values")
        if pixels is None or pixels.device != torch.device(device) or pixels.dtype != dtype:
            self.set_pixel_values(self.pixel_values(dtype, move or (lambda t: t.to(device))))


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
    cache_salt: str | None = None  # the prompt's `cache_salt` (vLLM's): see `Engine.add_request`
    priority: int = 0  # the request's scheduling priority: see `Engine.add_request`
