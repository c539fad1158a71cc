"""Pooling requests as the engine queues them: one prompt (`pooling_group`) or a batch checked
and converted at once (`check_pooling_batch`, for `Engine.add_requests`).

A batch's token ids become one int64 CPU tensor in one conversion (~15 ns a token instead of
the ~130 of `torch.tensor(list)`), range-checked against the vocab with one min / max, and each
request keeps its view of it (`Request.prompt_tensor`), which the pooling step concatenates.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.host_copy import host_tensor
from polymodal.llm_core.outputs import CompletionOutput
from polymodal.llm_core.pooling import PoolingParams
from polymodal.llm_core.request import Request
from polymodal.llm_core.request_checks import check_pooling_prompt, truncate_pooling_prompt
from polymodal.llm_core.request_group import RequestGroup


def pooling_group(
    request_id: str,
    prompt_token_ids: list[int],
    params: PoolingParams,
    max_model_len: int,
    chunkable: bool,
    token_type_ids: list[int] | None = None,
    prompt_tensor: torch.Tensor | None = None,
) -> RequestGroup:
    """A pooling request: one sequence (`<id>#0`) that samples nothing. The sequence and the
    group share `prompt_token_ids` (the engine never changes a pooling prompt)."""
    seq = Request(
        request_id=f"{request_id}#0",
        prompt_token_ids=prompt_token_ids,
        params=params,
        max_model_len=max_model_len,
        pooling=True,
        chunkable=chunkable,
        token_type_ids=token_type_ids,
        prompt_tensor=prompt_tensor,
    )
    return RequestGroup(request_id, prompt_token_ids, [seq], [None], [CompletionOutput(index=0)])


def check_pooling_batch(
    prompts: list,
    params: PoolingParams,
    token_type_ids: list | None,
    check: dict[str, Any],
    truncation_side: str = "right",
) -> tuple[list[list[int]], list[list[int] | None], list[torch.Tensor]]:
    """Every prompt of a batch truncated (`params.truncate_prompt_tokens`) and checked as
    `check_pooling_prompt` checks one (`check`: its model, model_config, max_model_len and
    budget), the first bad one raising with its index (`prompt 3: ...`); returns the prompts'
    token ids (fresh lists), segment ids and int64 CPU tensors (views of one)."""
    if token_type_ids is not None and len(token_type_ids) != len(prompts):
        raise InvalidInputError(
            f"token_type_ids has {len(token_type_ids)} entries for {len(prompts)} prompts"
        )
    types_in = token_type_ids if token_type_ids is not None else [None] * len(prompts)
    keep, max_len = params.truncate_prompt_tokens, check["max_model_len"]
    all_ids, all_types = [], []
    for i, (ids, types) in enumerate(zip(prompts, types_in)):
        try:
            ids = list(ids)
            if keep is not None:
                ids, types = truncate_pooling_prompt(ids, types, keep, max_len, truncation_side)
            check_pooling_prompt(ids, params, types, None, **check, check_vocab=False)
        except PolymodalError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from exc
        all_ids.append(ids)
        all_types.append(types)
    flat = _token_tensor(all_ids, params, check)
    return all_ids, all_types, list(flat.split([len(ids) for ids in all_ids]))


def _token_tensor(all_ids: list[list[int]], params, check: dict[str, Any]) -> torch.Tensor:
    """The prompts' ids concatenated as one int64 tensor, all in the vocab (else the first
    prompt with an id outside raises, with `check_pooling_prompt`'s message)."""
    vocab = check["model_config"].vocab_size
    try:
        flat = host_tensor(list(chain.from_iterable(all_ids)), torch.int64)
        in_vocab = bool(flat.min() >= 0) and bool(flat.max() < vocab)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # not ints, or huge ones
        flat, in_vocab = None, False
    if in_vocab:
        return flat
    for i, ids in enumerate(all_ids):  # find the bad prompt: its own check names the ids
        try:
            check_pooling_prompt(ids, params, None, None, **check)
        except PolymodalError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from exc
    raise InvalidInputError("prompt token ids must be integers")


@contextmanager
def paused_gc():
    """The cyclic GC off inside (restored after): creating thousands of request objects at
    once otherwise runs its older generations' scans over every live request several times
    (~10 us a request for a batch of 4k, issue 16); one young collection follows instead."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
