"""Embeddings given in place of what an encoder or the token table would make (vLLM's
embedding inputs). A prompt given as embeddings (`prompt_embeds`) is one `PROMPT_EMBEDS` item
over every position of a prompt of placeholder ids (`PLACEHOLDER_ID`, never read); an image
given as its vision tower's output (`image_embeds`, Qwen-VL) is an image item whose `data`
holds the rows (`embeds`) and its grid. Either way no encoder runs for them
(`media_inputs.encoded`); llm_core/prompt_embeds.py checks them against the model."""

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


# ---- an image given as its encoder's output (vLLM's `image_embeds`) -------------------------
def is_image_embeds(source: Any) -> bool:
    """Whether a media source is vLLM's `{"image_embeds": ..., "image_grid_thw": ...}`."""
    return isinstance(source, dict) and "image_embeds" in source


@dataclass
class GivenImage:
    """One image given as rows of its vision tower's output, with its patch grid."""

    embeds: torch.Tensor  # [rows, hidden]
    grid_thw: torch.Tensor  # int64 [1, 3]


def split_image_embeds(source: dict, merge_size: int, where: str) -> list[GivenImage]:
    """vLLM's Qwen-VL embeddings input, checked: `image_embeds` `[rows, hidden]` (the vision
    tower's merged output) and `image_grid_thw` `[3]` or `[k, 3]` (k images, their rows one
    after another); one `GivenImage` per image."""
    unknown = sorted(set(source) - {"image_embeds", "image_grid_thw"})
    if unknown or "image_grid_thw" not in source:
        raise InvalidInputError(
            f"{where} takes image_embeds with image_grid_thw"
            + (f" (unknown keys {unknown})" if unknown else "")
        )
    rows = as_embeds(source["image_embeds"], f"{where}.image_embeds")
    grids = torch.as_tensor(source["image_grid_thw"], dtype=torch.int64).reshape(-1, 3)
    sizes = [int(t * h * w) // merge_size**2 for t, h, w in grids.tolist()]
    if min(grids.flatten().tolist()) < 1 or sum(sizes) != rows.shape[0]:
        raise InvalidInputError(
            f"{where}: image_grid_thw {grids.tolist()} makes {sum(sizes)} rows (t*h*w / "
            f"{merge_size**2} each) but image_embeds has {rows.shape[0]}"
        )
    parts = torch.split(rows, sizes)
    return [GivenImage(part, grid[None]) for part, grid in zip(parts, grids)]


def image_embeds_item(given: GivenImage, item_class=MultimodalItem) -> MultimodalItem:
    """The image item of a `GivenImage` (slots set by the processor)."""
    data = {"embeds": given.embeds, "grid_thw": given.grid_thw}
    return item_class("image", data, -1, 0, content_hash("image_embeds", data))
