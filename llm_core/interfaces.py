"""Capability interfaces a model class opts into by inheriting them (plain classes, checked
with `isinstance`), instead of the engine probing for attributes.

- `SupportsMultiModal`: turns media items into slot embeddings (`encode`), may stage their
  tensors onto its device ahead of the step (`stage`) and replay CUDA graphs for its tower.
- `SupportsPooling`: a pooling model (classification, reward, embedding): no LM head; the
  runner hands it each finished prompt's hidden states and it returns one pooled tensor each.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class SupportsMultiModal:
    """A model whose prompts carry media slots filled by its own encoder."""

    supports_multimodal: ClassVar[bool] = True
    #: the tower class, resolved by the registry (a model file never imports encoders)
    tower_class: ClassVar[type | None] = None

    def encode(self, items: list) -> list[torch.Tensor]:
        """Embeddings `[num_slots, hidden]` for each media item, in order."""
        raise NotImplementedError

    def stage(self, items: list) -> None:
        """Put the items' tensors on the model's device ahead of the step (idempotent; may run
        on a preprocessing thread). Default: nothing to do."""

    def enable_cuda_graphs(self, wrap) -> None:
        """Called once the decoder's graphs are captured: a tower that opts in may replay its
        own through `wrap(tower)` (a callable with the tower's forward contract)."""


class SupportsPooling:
    """A model served for a pooling task (`ModelRow.task`): it returns pooled tensors instead
    of sampling tokens. `is_causal = False` models (bidirectional encoders) run each prompt
    whole in one step (no chunked prefill)."""

    is_pooling_model: ClassVar[bool] = True
    is_causal: ClassVar[bool] = True
    #: `embed(input_ids, positions, token_type_ids)`: absolute position and segment embeddings
    embeds_positions: ClassVar[bool] = False

    def pool(self, hidden: torch.Tensor, prompts: list) -> list[torch.Tensor]:
        """hidden: `[num_tokens, hidden]` of this step's finished prompts, concatenated in
        order; `prompts`: per prompt a `PoolingInput` (token ids, pooling params). Returns one
        tensor per prompt."""
        raise NotImplementedError


def supports_multimodal(model) -> bool:
    """Whether `model` (an instance or a class) takes media items."""
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsMultiModal)


def is_pooling_model(model) -> bool:
    """Whether `model` (an instance or a class) is served for a pooling task."""
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsPooling)
