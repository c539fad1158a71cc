"""Engine outputs across the engine-process pipe: what changed, as plain tuples.

A `RequestOutput` is a tree of slotted dataclasses whose pickling runs Python code per object,
and it carries each sequence's whole text and token ids at every step. At 256 streamed requests
that pickling (engine process) and unpickling (API process) took more of each process's GIL
than the engine thread itself (H200, py-spy). So the child sends per step only what the step
added, as tuples of plain values (pickled in C), and the parent's `Assembler` rebuilds the
same `RequestOutput`s the engine made: texts and token ids are the joined deltas (the final
text comes whole, since a matched stop string cuts it), logprobs the appended tables.

A pooling output (`PoolingRequestOutput`, always final) crosses as its tensor's raw bytes,
dtype and shape: a pickled tensor would go through torch's shared-memory reducers.
"""

from __future__ import annotations

from typing import Any

import torch

from polymodal.llm_core.outputs import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    Timings,
    Usage,
)
from polymodal.llm_core.pooling import PoolingOutput, PoolingRequestOutput


def encode(out: RequestOutput, first: bool) -> tuple:
    """What `out` adds to its request (`first`: the request's first output)."""
    choices = tuple(
        (
            c.index,
            c.delta_text,
            c.delta_token_ids,
            c.finish_reason,
            c.stop_reason,
            c.logprobs[len(c.logprobs) - len(c.delta_token_ids) :]
            if c.logprobs and c.delta_token_ids
            else None,
            c.cumulative_logprob,
            c.text if c.finish_reason is not None else None,
        )
        for c in out.outputs
    )
    m = out.metrics
    metrics = None if m is None else (
        m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
        m.finished_time,
    )  # fmt: skip
    prompt = (
        (out.prompt_token_ids, out.prompt_logprobs, out.prompt, out.num_cached_tokens)
        if first
        else None
    )
    return (
        out.finished,
        choices,
        (out.usage.prompt_tokens, out.usage.completion_tokens),
        (out.timings.time_to_first_token, out.timings.total),
        metrics,
        prompt,
    )


class Encoder:
    """The child's side: remembers which requests already sent their prompt."""

    def __init__(self) -> None:
        self._started: set[str] = set()

    def __call__(self, request_id: str, item: Any) -> Any:
        if isinstance(item, PoolingRequestOutput):
            return ("pooled", encode_pooled(item))
        if not isinstance(item, RequestOutput):
            self._started.discard(request_id)
            return item  # an exception or END: as is
        first = request_id not in self._started
        if item.finished:
            self._started.discard(request_id)
        else:
            self._started.add(request_id)
        return ("output", encode(item, first))


class Assembler:
    """The parent's side: rebuilds each request's `RequestOutput` from its encoded steps."""

    def __init__(self) -> None:
        # request id -> [(prompt ids, prompt logprobs, prompt, cached tokens),
        #                {index: [text, ids, logprobs]}]
        self._requests: dict[str, list] = {}

    def __call__(self, request_id: str, item: Any) -> Any:
        # (this runs for every request at every step, on the reader thread: kept lean)
        kind = item[0] if type(item) is tuple and item else None
        if kind != "output":
            if kind == "pooled":
                return decode_pooled(request_id, item[1])
            self._requests.pop(request_id, None)
            return item
        finished, choices, usage, timings, metrics, prompt = item[1]
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = [prompt or ([], None, None, None), {}]
        seqs = state[1]
        outputs = []
        for index, delta, delta_ids, reason, stop, logprobs, cumulative, text in choices:
            seq = seqs.get(index)
            if seq is None:
                seq = seqs[index] = ["", [], None]
            seq[0] = text if text is not None else seq[0] + delta
            delta_ids = list(delta_ids)
            seq[1] = seq[1] + delta_ids  # a new list: earlier outputs keep theirs
            if logprobs is not None:
                seq[2] = (seq[2] or []) + list(logprobs)
            outputs.append(
                CompletionOutput(
                    index, seq[0], seq[1], reason, stop, seq[2], delta, delta_ids, cumulative
                )
            )
        if finished:
            del self._requests[request_id]
        token_ids, prompt_logprobs, prompt_text, cached = state[0]
        return RequestOutput(
            request_id,
            token_ids,
            outputs,
            finished,
            Usage(*usage),
            Timings(*timings),
            prompt_text,
            prompt_logprobs,
            None if metrics is None else RequestMetrics(*metrics),
            cached,
        )  # fmt: skip


def encode_pooled(out: PoolingRequestOutput) -> tuple:
    """`(prompt token ids, tensor bytes, dtype name, shape)` of a pooling output."""
    data = out.outputs.data.detach().cpu().contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return (out.prompt_token_ids, raw, str(data.dtype).removeprefix("torch."), tuple(data.shape))


def decode_pooled(request_id: str, wire: tuple) -> PoolingRequestOutput:
    """The `PoolingRequestOutput` that `encode_pooled` sent."""
    token_ids, raw, dtype, shape = wire
    dtype = getattr(torch, dtype)
    if raw:
        data = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    else:
        data = torch.empty(shape, dtype=dtype)
    return PoolingRequestOutput(request_id, list(token_ids), PoolingOutput(data))
