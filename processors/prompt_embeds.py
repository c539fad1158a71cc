"""Embeddings given in place of what an encoder or the token table would make (vLLM's
embedding inputs). A prompt given as embeddings (`prompt_embeds`) is one `PROMPT_EMBEDS` item
over every position of a prompt of placeholder ids (`PLACEHOLDER_ID`, never read); an image
or a video given as its vision tower's output (`image_embeds` / `video_embeds`, Qwen-VL) is an
image or video item whose `data` holds the rows (`embeds`) and its grid. Either way no encoder
runs for them (`media_inputs.encoded`); llm_core/prompt_embeds.py checks them against the
model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.hashing import content_hash
from polymodal.processors.types import PROMPT_EMBEDS, MultimodalItem, ProcessedPrompt

PLACEHOLDER_ID = 0  # the token id at each position of a prompt given as embeddings


def as_embeds(value, where: str = "prompt_embeds") -> torch.Tensor:
    """`value` checked as a prompt's embeddings: a floating tensor `[num_tokens, hidden]` (or
    `[1, num_tokens, hidden]`), non-empty and finite, detached."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(
            f"{where} must be a torch.Tensor [num_tokens, hidden_size], got {type(value).__name__}"
        )
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise InvalidInputError(
            f"{where} must have shape [num_tokens, hidden_size] with num_tokens >= 1, got "
            f"{list(value.shape)}"
        )
    if not value.is_floating_point():
        raise InvalidInputError(f"{where} must be a floating-point tensor, got {value.dtype}")
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        raise InvalidInputError(f"{where} holds NaN or infinite values")
    return value


def embeds_prompt(value, where: str = "prompt_embeds") -> ProcessedPrompt:
    """The processed prompt of the embeddings `value` (checked by `as_embeds`): its rows at
    positions `[0, num_tokens)`, keyed by their content hash."""
    rows = as_embeds(value, where)
    key = content_hash(PROMPT_EMBEDS, {"embeds": rows})
    item = MultimodalItem(PROMPT_EMBEDS, {"embeds": rows}, 0, rows.shape[0], key)
    return ProcessedPrompt([PLACEHOLDER_ID] * rows.shape[0], None, 0, [item])


# ---- media given as its encoder's output (vLLM's `image_embeds` / `video_embeds`) ----------
def is_media_embeds(source: Any, modality: str = "image") -> bool:
    """Whether a media source is vLLM's `{"<modality>_embeds": ..., "<modality>_grid_thw":
    ...}`."""
    return isinstance(source, dict) and f"{modality}_embeds" in source


@dataclass
class GivenMedia:
    """One image or video given as rows of its vision tower's output, with its patch grid
    (and a video's seconds per temporal grid step: 1.0 unless given, as transformers')."""

    embeds: torch.Tensor  # [rows, hidden]
    grid_thw: torch.Tensor  # int64 [1, 3]
    modality: str = "image"
    second_per_grid: float = 1.0


def split_media_embeds(
    source: dict, modality: str, merge_size: int, where: str
) -> list[GivenMedia]:
    """vLLM's Qwen-VL embeddings input, checked: `<modality>_embeds` `[rows, hidden]` (the
    vision tower's merged output) and `<modality>_grid_thw` `[3]` or `[k, 3]` (k items, their
    rows one after another); a video's optional `second_per_grid_ts` (a number, or one per
    video). One `GivenMedia` per item."""
    rows_key, grid_key = f"{modality}_embeds", f"{modality}_grid_thw"
    known = {rows_key, grid_key} | ({"second_per_grid_ts"} if modality == "video" else set())
    unknown = sorted(set(source) - known)
    if unknown or grid_key not in source:
        raise InvalidInputError(
            f"{where} takes {rows_key} with {grid_key}"
            + (f" (unknown keys {unknown})" if unknown else "")
        )
    rows = as_embeds(source[rows_key], f"{where}.{rows_key}")
    grids = torch.as_tensor(source[grid_key], dtype=torch.int64).reshape(-1, 3)
    sizes = [int(t * h * w) // merge_size**2 for t, h, w in grids.tolist()]
    if min(grids.flatten().tolist()) < 1 or sum(sizes) != rows.shape[0]:
        raise InvalidInputError(
            f"{where}: {grid_key} {grids.tolist()} makes {sum(sizes)} rows (t*h*w / "
            f"{merge_size**2} each) but {rows_key} has {rows.shape[0]}"
        )
    seconds = torch.as_tensor(source.get("second_per_grid_ts", 1.0), dtype=torch.float64)
    seconds = seconds.reshape(-1).expand(len(sizes)) if seconds.numel() == 1 else seconds
    if seconds.numel() != len(sizes) or not bool((seconds > 0).all()):
        raise InvalidInputError(
            f"{where}: second_per_grid_ts must be one positive number or one per video "
            f"({len(sizes)}), got {source.get('second_per_grid_ts')!r}"
        )
    parts = torch.split(rows, sizes)
    return [GivenMedia(part, grid[None], modality, float(sec))
            for part, grid, sec in zip(parts, grids, seconds.tolist())]  # fmt: skip


def media_embeds_item(given: GivenMedia, item_class=MultimodalItem) -> MultimodalItem:
    """The media item of a `GivenMedia` (slots set by the processor)."""
    data = {"embeds": given.embeds, "grid_thw": given.grid_thw}
    # a video's time step moves its positions: part of what its KV depends on
    key = {**data, "second_per_grid": torch.tensor([given.second_per_grid], dtype=torch.float64)}
    return item_class(given.modality, data, -1, 0, content_hash(f"{given.modality}_embeds", key))
