"""Pooling requests as the engine queues them: checked prompts wait in a `PoolingQueue` and
become requests (`pooling_group`) a step's worth at a time; a batch is checked and converted at
once (`check_pooling_batch`, for `Engine.add_requests`).

Why a queue of prompts rather than of requests: building a `Request` and its `RequestGroup`
costs ~5 us a prompt (and the GC's scans of thousands of them more), which, done for a whole
batch in `add_requests`, delayed the first step by ~20 us a prompt (issue 16: ~80 ms for 4096
prompts). Built in the step that admits them, they overlap the previous step on the device.

A batch's token ids become one int64 CPU tensor as they are checked (`array.fromlist`, ~15 ns a
token, instead of the ~130 of `torch.tensor(list)`), range-checked against the vocab with one
min / max, and each request keeps its view of it (`Request.prompt_tensor`), which the pooling
step concatenates; its `prompt_token_ids` list is made from the view when it is built.
"""

from __future__ import annotations

import gc
from array import array
from collections import OrderedDict
from contextlib import contextmanager
from itertools import repeat
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.outputs import CompletionOutput
from polymodal.llm_core.pooling import PoolingParams
from polymodal.llm_core.request import Request
from polymodal.llm_core.request_checks import (
    atomic_spans,
    check_pooling_prompt,
    truncate_pooling_prompt,
    truncate_prompt,
)
from polymodal.llm_core.request_group import RequestGroup


def pooling_group(
    request_id: str,
    prompt_token_ids: list[int],
    params: PoolingParams,
    max_model_len: int,
    chunkable: bool,
    token_type_ids: list[int] | None = None,
    prompt_tensor: torch.Tensor | None = None,
    media: dict | None = None,
) -> RequestGroup:
    """A pooling request: one sequence (`<id>#0`) that samples nothing. The sequence and the
    group share `prompt_token_ids` (the engine never changes a pooling prompt). `media`: a
    multimodal prompt's Request fields (positions, mrope_delta, mm_items, atomic_spans)."""
    seq = Request(
        request_id=f"{request_id}#0",
        prompt_token_ids=prompt_token_ids,
        params=params,
        max_model_len=max_model_len,
        pooling=True,
        chunkable=chunkable,
        token_type_ids=token_type_ids,
        prompt_tensor=prompt_tensor,
        **(media or {}),
    )
    return RequestGroup(request_id, prompt_token_ids, [seq], [None], [CompletionOutput(index=0)])


class PoolingQueue:
    """Pooling prompts checked and queued, in order, that are not requests yet. `take` builds
    the first ones as `RequestGroup`s (the engine does it for the step about to be scheduled);
    a queued prompt can be looked up and dropped by request id (abort)."""

    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len
        # request id -> (token ids or None, params, segment ids or None, int64 CPU tensor or
        # None, media fields or None): one of ids and tensor is given (`add_requests` gives
        # tensors)
        self.prompts: OrderedDict[str, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.prompts

    def add(self, request_ids: list[str], prompts: list | None, params: PoolingParams,
            token_type_ids: list, tensors: list | None,
            media: list | None = None) -> None:  # fmt: skip
        """Queue checked prompts: per prompt its token ids (lists) or its int64 tensor, its
        segment ids (None: the model's zeros) and its media fields (`pooling_group`)."""
        none = repeat(None)
        entries = zip(prompts or none, repeat(params), token_type_ids, tensors or none,
                      media or none)  # fmt: skip
        self.prompts.update(zip(request_ids, entries))

    def discard(self, request_id: str) -> bool:
        """Drop a queued prompt; whether it was queued."""
        return self.prompts.pop(request_id, None) is not None

    def admit(self, scheduler, chunkable: bool) -> list[RequestGroup]:
        """`take` what the scheduler's next step may admit: as many prompts as fit its
        sequences and tokens after those already running or waiting."""
        waiting = scheduler.waiting
        max_seqs = scheduler.max_num_seqs - len(scheduler.running) - len(waiting)
        tokens = scheduler.max_num_batched_tokens - sum(r.num_tokens for r in waiting)
        return self.take(max_seqs, tokens, chunkable)

    def take(self, max_seqs: int, max_tokens: int, chunkable: bool) -> list[RequestGroup]:
        """Requests of the first queued prompts: at most `max_seqs`, and no more once their
        tokens reach `max_tokens` (what one step may admit; nothing when either is <= 0).
        `chunkable`: whether the model may split a prompt across steps (a causal one)."""
        groups, tokens, prompts = [], 0, self.prompts
        while prompts and len(groups) < max_seqs and tokens < max_tokens:
            request_id, (ids, params, types, tensor, media) = prompts.popitem(last=False)
            ids = tensor.tolist() if ids is None else ids
            groups.append(pooling_group(request_id, ids, params, self.max_model_len, chunkable,
                                        types, tensor, media))  # fmt: skip
            tokens += len(ids)
        return groups


def queue_pooling_prompt(engine, request_id: str, ids: list[int], params: PoolingParams,
                         token_type_ids: list[int] | None, media: tuple) -> None:  # fmt: skip
    """`Engine.add_request` of one pooling prompt: truncated (`truncate_prompt_tokens`),
    checked and queued. `media`: (positions, mrope_delta, mm_items) of a multimodal prompt
    (a multimodal embedding model's), kept for its request."""
    positions, mrope_delta, mm_items = media
    keep = params.truncate_prompt_tokens
    if keep is not None and mm_items:  # cut as a generation prompt is (media kept whole)
        ids, positions, mrope_delta, mm_items = truncate_prompt(
            ids, positions, mrope_delta, mm_items, keep, engine.max_model_len
        )
    elif keep is not None:
        side = getattr(engine.tokenizer, "truncation_side", "right")
        ids, token_type_ids = truncate_pooling_prompt(
            ids, token_type_ids, keep, engine.max_model_len, side
        )
    check_pooling_prompt(ids, params, token_type_ids, mm_items, **engine._pooling_checks())
    fields = None
    if mm_items or positions is not None:
        model, budget = engine.runner.model, engine.scheduler.max_num_batched_tokens
        mm_items = model.split_media(mm_items, engine.scheduler.max_num_encoder_tokens)
        fields = {"positions": positions, "mrope_delta": mrope_delta, "mm_items": mm_items,
                  "atomic_spans": atomic_spans(model, mm_items, budget)}  # fmt: skip
    engine._pooling.add([request_id], [list(ids)], params, [token_type_ids], None, [fields])


def check_pooling_batch(
    prompts: list,
    params: PoolingParams,
    token_type_ids: list | None,
    check: dict[str, Any],
    truncation_side: str = "right",
) -> tuple[list[list[int] | None], list[torch.Tensor]]:
    """Every prompt of a batch truncated (`params.truncate_prompt_tokens`) and checked as
    `check_pooling_prompt` checks one (`check`: its model, model_config, max_model_len and
    budget), the first bad one raising with its index (`prompt 3: ...`); returns the prompts'
    segment ids and token ids as int64 CPU tensors (views of one: the engine's own copy, which
    the caller's lists changing later cannot touch)."""
    if token_type_ids is not None and len(token_type_ids) != len(prompts):
        raise InvalidInputError(
            f"token_type_ids has {len(token_type_ids)} entries for {len(prompts)} prompts"
        )
    types_in = token_type_ids if token_type_ids is not None else [None] * len(prompts)
    keep, max_len = params.truncate_prompt_tokens, check["max_model_len"]
    flat, lens, all_types = array("q"), [], []  # every prompt's ids, appended as checked
    for i, (ids, types) in enumerate(zip(prompts, types_in)):
        try:
            if keep is not None:
                ids, types = truncate_pooling_prompt(
                    list(ids), types, keep, max_len, truncation_side
                )
            check_pooling_prompt(ids, params, types, None, **check, check_vocab=False)
            _append_ids(flat, ids, params, check)
        except PolymodalError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from exc
        lens.append(len(ids))
        all_types.append(types)
    if not lens:
        return [], []
    tensor = torch.frombuffer(flat, dtype=torch.int64)  # [total tokens]
    tensors = tensor.split(lens)
    vocab = check["model_config"].vocab_size
    if tensor.min() < 0 or tensor.max() >= vocab:
        for i, ids in enumerate(tensors):  # find the bad prompt: its own check names the ids
            try:
                check_pooling_prompt(ids.tolist(), params, None, None, **check)
            except PolymodalError as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
    return all_types, list(tensors)


def _append_ids(flat: array, ids, params: PoolingParams, check: dict[str, Any]) -> None:
    """`ids` appended to `flat` (~15 ns a value from a list: the batch's one conversion);
    ids that are not ints raise."""
    try:
        flat.fromlist(ids if type(ids) is list else list(ids))
    except (TypeError, OverflowError):  # not ints, or huge ones (named when outside the vocab)
        check_pooling_prompt(list(ids), params, None, None, **check)
        raise InvalidInputError("prompt token ids must be integers") from None


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
