"""Engine outputs -> OpenAI response bodies and SSE chunks (chat and legacy completions)."""

from __future__ import annotations

import json
from typing import Any

from polymodal.llm_core.outputs import RequestOutput
from polymodal.server.openai_format import chat_logprobs, completion_logprobs, delta_logprobs
from polymodal.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    UsageInfo,
    new_id,
    now,
)

DONE = "data: [DONE]\n\n"


def sse(payload: Any) -> str:
    """One server-sent event carrying a JSON object (a pydantic model or a dict)."""
    body = (
        payload.model_dump_json(exclude_none=False)
        if hasattr(payload, "model_dump_json")
        else (json.dumps(payload))
    )
    return f"data: {body}\n\n"


def usage_info(out: RequestOutput) -> UsageInfo:
    """OpenAI usage from an engine output."""
    u = out.usage
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


class ResponseBuilder:
    """Builds the responses of one request; `top_n` is the number of top logprobs (or None)."""

    def __init__(self, kind: str, model: str, tokenizer: Any, top_n: int | None):
        self.kind = kind  # "chat" | "completion"
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        self.model = model
        self.tokenizer = tokenizer
        self.top_n = top_n
        self._started: set[int] = set()  # choices whose role chunk was sent
        self._finished: set[int] = set()

    def _logprobs(self, token_ids, tables) -> dict[str, Any] | None:
        if self.top_n is None or not tables:
            return None
        fmt = chat_logprobs if self.kind == "chat" else completion_logprobs
        return fmt(self.tokenizer, token_ids, tables, self.top_n)

    def full(self, out: RequestOutput):
        """The non-streamed response for a finished request."""
        if self.kind == "chat":
            choices = [
                ChatChoice(
                    index=c.index,
                    message=ChatResponseMessage(role="assistant", content=c.text),
                    logprobs=self._logprobs(c.token_ids, c.logprobs),
                    finish_reason=_finish_reason(c.finish_reason),
                )
                for c in out.outputs
            ]
            return ChatCompletionResponse(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage_info(out),
            )
        choices = [
            CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=self._logprobs(c.token_ids, c.logprobs),
                finish_reason=_finish_reason(c.finish_reason),
            )
            for c in out.outputs
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=usage_info(out),
        )  # fmt: skip

    def chunks(self, out: RequestOutput) -> list[str]:
        """SSE events for what one engine step added to the request (one per choice)."""
        events = []
        for c in out.outputs:
            if c.index in self._finished:
                continue
            token_ids, tables = delta_logprobs(c)
            logprobs = self._logprobs(token_ids, tables)
            reason = _finish_reason(c.finish_reason)
            if reason is not None:
                self._finished.add(c.index)
            if not c.delta_text and reason is None and logprobs is None:
                continue
            if self.kind == "chat":
                role = None if c.index in self._started else "assistant"
                self._started.add(c.index)
                choice = ChatChunkChoice(
                    index=c.index,
                    delta=ChatResponseMessage(role=role, content=c.delta_text),
                    logprobs=logprobs,
                    finish_reason=reason,
                )
                events.append(sse(self._chat_chunk([choice])))
            else:
                choice = CompletionChoice(
                    index=c.index, text=c.delta_text, logprobs=logprobs, finish_reason=reason
                )
                events.append(sse(self._completion_chunk([choice])))
        return events

    def usage_chunk(self, out: RequestOutput) -> str:
        """The last chunk of a stream with `stream_options.include_usage` (no choices)."""
        if self.kind == "chat":
            return sse(self._chat_chunk([], usage_info(out)))
        return sse(self._completion_chunk([], usage_info(out)))

    def _chat_chunk(self, choices, usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _completion_chunk(self, choices, usage=None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
