"""A prompt given as embeddings (vLLM's `prompt_embeds`) as the engine takes it: one
`PROMPT_EMBEDS` item over every position of a prompt of placeholder ids (`PLACEHOLDER_ID`, never
read). What the engine does with it: llm_core/prompt_embeds.py."""

from __future__ import annotations

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
