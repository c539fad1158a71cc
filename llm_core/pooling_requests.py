"""Pooling requests as the engine queues them: checked prompts wait in a `PoolingQueue` and
become requests (`pooling_group`) a step's worth at a time; a batch is checked and converted at
once (`check_pooling_batch`, for `Engine.add_requests`).

Why a queue of prompts rather than of requests: building a `Request` and its `RequestGroup`
costs ~5 us a prompt (and the GC's scans of thousands of them more), which, done for a whole
batch in `add_requests`, delayed the first step by ~20 us a prompt (issue 16: ~80 ms for 4096
prompts). Built in the step that admits them, they overlap the previous step on the device.

A batch's token ids become one int64 CPU tensor in one conversion (~15 ns a token instead of
the ~130 of `torch.tensor(list)`), range-checked against the vocab with one min / max, and each
request keeps its view of it (`Request.prompt_tensor`), which the pooling step concatenates.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from contextlib import contextmanager
from itertools import chain, repeat
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


class PoolingQueue:
    """Pooling prompts checked and queued, in order, that are not requests yet. `take` builds
    the first ones as `RequestGroup`s (the engine does it for the step about to be scheduled);
    a queued prompt can be looked up and dropped by request id (abort)."""

    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len
        # request id -> (token ids, params, segment ids or None, int64 CPU tensor or None)
        self.prompts: OrderedDict[str, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.prompts

    def add(self, request_ids: list[str], prompts: list, params: PoolingParams,
            token_type_ids: list, tensors: list) -> None:  # fmt: skip
        """Queue checked prompts (their ids, segment ids and tensors: one entry each)."""
        entries = zip(prompts, repeat(params), token_type_ids, tensors)
        self.prompts.update(zip(request_ids, entries))

    def discard(self, request_id: str) -> bool:
        """Drop a queued prompt; whether it was queued."""
        return self.prompts.pop(request_id, None) is not None

    def take(self, max_seqs: int, max_tokens: int, chunkable: bool) -> list[RequestGroup]:
        """Requests of the first queued prompts: at most `max_seqs`, and no more once their
        tokens reach `max_tokens` (what one step may admit; nothing when either is <= 0).
        `chunkable`: whether the model may split a prompt across steps (a causal one)."""
        groups, tokens, prompts = [], 0, self.prompts
        while prompts and len(groups) < max_seqs and tokens < max_tokens:
            request_id, (ids, params, types, tensor) = prompts.popitem(last=False)
            groups.append(
                pooling_group(
                    request_id, ids, params, self.max_model_len, chunkable, types, tensor
                )
            )
            tokens += len(ids)
        return groups


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
