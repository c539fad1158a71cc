"""Images given as their projected vision-tower output (vLLM's image embeddings) for the
families whose placeholders expand in the prompt text (processors/base.py): LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision and Gemma 3 take `multi_modal_data={"image": rows}`, `rows` a
floating-point tensor `[num_rows, hidden_size]` of one image (a `[k, num_rows, hidden_size]`
tensor: k images; a uint8 tensor stays pixels), or a chat part `{"type": "image_embeds",
"image_embeds": rows}`.

The rows go where the tower's would: the image's placeholder expands to `num_rows` embed
tokens (the family's `embeds_expansion`: LLaVA's image tokens, Gemma 3's between its
begin / end-of-image tokens), no encoder runs, and the rows' content hash keys the prefix
cache. As vLLM takes them, the rows are the whole image's: LLaVA-NeXT's anyres rows with their
newline rows, Gemma 3's 256 pooled rows of one view (no pan-and-scan crops). Qwen-VL takes rows
with their patch grid (`prompt_embeds.split_media_embeds`).
"""

from __future__ import annotations

from typing import Any

import torch

from polymodal.llm_core.errors import MediaError
from polymodal.processors.hashing import content_hash
from polymodal.processors.prompt_embeds import as_embeds
from polymodal.processors.types import MultimodalItem

TAKES_EMBEDS = (
    "Qwen2-VL / Qwen2.5-VL (rows with image_grid_thw), LLaVA-1.5, LLaVA-OneVision, LLaVA-NeXT, "
    "Gemma 3"
)


def given_rows(source: Any) -> torch.Tensor | None:
    """The rows of an image given as embeddings: a floating-point tensor, or `{"image_embeds":
    rows}` alone (a chat part's); None for anything else (pixels, files, Qwen's rows + grid)."""
    if isinstance(source, dict) and set(source) == {"image_embeds"}:
        source = source["image_embeds"]
    if isinstance(source, torch.Tensor) and source.is_floating_point():
        return source
    return None


def split_batched(items: list) -> list:
    """vLLM's batched form: a `[k, num_rows, hidden]` floating-point tensor is k images."""
    out = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() == 3:
            out.extend(item.unbind(0))
        else:
            out.append(item)
    return out


def embeds_item(processor: Any, index: int, rows: torch.Tensor) -> tuple[MultimodalItem, str]:
    """(item, expansion text) of image `index` (0-based) given as `rows`."""
    where = f"image {index + 1} embeddings"
    rows = as_embeds(rows, where)
    expansion = processor.embeds_expansion(rows.shape[0])
    if expansion is None:
        raise MediaError(
            f"{where}: {type(processor).__name__} takes images, not their embeddings (taken by "
            f"{TAKES_EMBEDS})"
        )
    key = content_hash("image_embeds", {"embeds": rows})
    return MultimodalItem("image", {"embeds": rows}, -1, rows.shape[0], key), expansion
