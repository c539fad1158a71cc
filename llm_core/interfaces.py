"""Capability interfaces a model class opts into by inheriting them (plain classes, checked
with `isinstance`), instead of the engine probing for attributes.

- `SupportsMultiModal`: turns media items into embeddings (`encode`), stages their tensors
  onto its device ahead of the step (`stage`), may cut an item into pieces its encoder runs
  apart (`split_media`: a long video), may replay CUDA graphs for its tower, and says
  how its decoder attends over media (`bidirectional_media`); a model with cross-attention
  layers lays out a request's encoder rows (`cross_states`) and says which rows each token
  attends to (`cross_ranges`).
- `SupportsPooling`: a pooling model (classification, reward, embedding): no LM head; the
  runner hands it each finished prompt's hidden states and it returns one pooled tensor each.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch

from polymodal.llm_core.host_copy import copy_to


class SupportsMultiModal:
    """A model whose prompts carry media items (`processors.types.MultimodalItem`) filled by
    the encoder its registry row names (built by the loader: a model file imports no encoder).

    The runner's contract: `encode(items)` returns one tensor per item, `[item.num_embeds,
    hidden]`, written into the item's slot positions (`embed_mask`); `stage(items)` may run on
    a preprocessing thread before the request reaches the engine.
    """

    supports_multimodal: ClassVar[bool] = True
    #: the decoder attends bidirectionally among the embedded tokens of each item's runs
    #: (`MultimodalItem.embed_runs`; Gemma 3): the scheduler never splits a run across steps
    #: and the runner hands the runs to the attention as per-token key ranges
    bidirectional_media: ClassVar[bool] = False
    #: set by the engine (`media_inputs.embeddings_cached`): whether the encoder cache holds
    #: an item's output, so the encoder will not run for it and `stage_ahead` leaves its
    #: pixels on the host (a repeated 64-frame video: no 177 MB upload, no resize); `encode`
    #: stages them after all if the entry is evicted first. None (no engine): stage all.
    embeddings_cached: Callable[[Any], bool] | None = None

    def stage_ahead(self, items: list) -> None:
        """`stage` the items a step may encode, from a preprocessing thread before the request
        reaches the engine: all but those whose encoder output is cached."""
        cached = self.embeddings_cached
        self.stage(list(items) if cached is None else [it for it in items if not cached(it)])

    def encode(self, items: list) -> list[torch.Tensor]:
        """Embeddings `[num_embeds, hidden]` for each media item, in order."""
        raise NotImplementedError

    def warm_up_encoder(self) -> None:
        """Run the encoder once on dummy media of the sizes whose first call compiles or builds
        something (`llm_core/load_warmup.py`: at load, on CUDA). Default: nothing."""

    def split_media(self, items: list, max_rows: int) -> list:
        """The items as the engine books and encodes them. A model whose encoder computes an
        item's rows in independent parts (Qwen-VL: each temporal patch of a video alone) may
        return such an item as consecutive pieces of at most `max_rows` rows each (a part
        larger than that is one piece), each an item with its own slots and content hash, so
        one step's encoder call stays within the budget however long the video. Default: the
        items as they are."""
        return items

    def media_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where and in what dtype the encoder takes its inputs (default: the LM head's; an
        embedding model, which drops it: the token embeddings')."""
        head = getattr(self, "lm_head", None)
        weight = head.weight if head is not None else self.model.embed_tokens.weight
        return weight.device, weight.dtype

    def stage(self, items: list) -> None:
        """Put the items' tensors on the model's device ahead of the step (idempotent; may run
        on a preprocessing thread): raw frames are copied (pinned, asynchronous) and turned
        into pixel values there by the processor's recipe (`MultimodalItem.stage`)."""
        device, dtype = self.media_device_dtype()
        move = partial(copy_to, device=device)
        for item in items:
            item.stage(device, dtype, move)

    def cross_states(self, items: list, outputs: list[torch.Tensor]) -> torch.Tensor:
        """A request's encoder rows `[rows, hidden]` that its cross-attention layers read, from
        the encoder outputs of its cross-attention items (in order). Default: concatenated."""
        return torch.cat(outputs)

    def store_cross_states(self, states: torch.Tensor, kv_caches: list, meta) -> bool:
        """Write a step's encoder rows' K/V (`cross_states`, at each cross group's slots) into
        the cross caches ahead of the step, so the step itself may replay a prefill graph
        (graphs store no encoder rows). Returns whether it did; default False: the step runs
        eager and its cross layers store them as they run."""
        return False

    def cross_ranges(self, items: list, num_prompt_tokens: int) -> list[tuple[int, int, int, int]]:
        """Which of a request's encoder rows (as `cross_states` lays them out) each token attends
        to: pieces `(first position, lo, hi, gate)` in position order, each holding until the
        next, the last one for the generated tokens too (lo == hi: no rows; gate 0: the
        reference masks the token's row out, the model decides what that means). `items`: the
        request's cross-attention items, in order. Default: every token sees every row."""
        rows = sum(item.num_embeds for item in items)
        return [(0, 0, rows, 1)] if rows else []

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
    #: per-token tasks ("token_embed", "token_classify") -> the checkpoint file of their head
    #: (bge-m3: colbert_linear.pt, sparse_linear.pt); a request for one needs that file
    token_task_files: ClassVar[dict[str, str]] = {}

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> list[torch.Tensor] | torch.Tensor:
        """hidden: per finished prompt of this step, its `[num_tokens, hidden]` (a `PromptRows`
        when the step ran whole prompts only: `pooled_rows` gathers from it in one op);
        `prompts`: per prompt a `PoolingInput` (token ids, pooling params). Returns one tensor
        per prompt, or one tensor whose rows are the prompts' outputs (copied to the host in
        one piece)."""
        raise NotImplementedError

    def embedding_dimension(self) -> int | None:
        """An embedding model's vector size (what `dimensions` may cut); None for others."""
        return None


def supports_multimodal(model) -> bool:
    """Whether `model` (an instance or a class) takes media items."""
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsMultiModal)


def is_pooling_model(model) -> bool:
    """Whether `model` (an instance or a class) is served for a pooling task."""
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsPooling)
