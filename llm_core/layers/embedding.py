"""Prompt-tuning slots: scatter encoder outputs into the token embeddings."""

from __future__ import annotations

import torch

from polymodal.llm_core.errors import InvalidInputError


def merge_multimodal_embeddings(
    inputs_embeds: torch.Tensor, slot_indices: torch.Tensor, mm_embeds: torch.Tensor
) -> torch.Tensor:
    """Write `mm_embeds [n, hidden]` into `inputs_embeds [num_tokens, hidden]` at `slot_indices`.

    The counts must agree exactly: a mismatch means the prompt's placeholder expansion and the
    encoder disagree, and silently truncating would feed the decoder wrong embeddings.
    """
    if slot_indices.numel() != mm_embeds.shape[0]:
        raise InvalidInputError(
            f"multimodal slot count mismatch: the prompt has {slot_indices.numel()} slot tokens "
            f"in this step but the encoders produced {mm_embeds.shape[0]} embeddings"
        )
    if mm_embeds.shape[-1] != inputs_embeds.shape[-1]:
        raise InvalidInputError(
            f"encoder hidden size {mm_embeds.shape[-1]} != decoder hidden size "
            f"{inputs_embeds.shape[-1]}"
        )
    inputs_embeds[slot_indices] = mm_embeds.to(inputs_embeds.dtype)
    return inputs_embeds
