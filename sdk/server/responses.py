"""Engine outputs -> OpenAI response bodies and SSE chunks (chat and legacy completions).

One HTTP request may run several engine requests (one per completion prompt); choice `i` of
prompt `p` is choice `p * n + i` of the response, as OpenAI numbers them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # the C encoder of json.dumps(s, ensure_ascii=False)
from typing import Any

from polymodal.llm_core.outputs import CompletionOutput, RequestOutput
from polymodal.server.openai_format import (
    chat_logprobs,
    completion_logprobs,
    delta_logprobs,
    prompt_logprob_entries,
)
from polymodal.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    new_id,
    now,
    usage_info,
)
from polymodal.server.reasoning import Reasoning, ReasoningStream
from polymodal.server.required_calls import RequiredCallStream, required_reply
from polymodal.server.tools import ToolParser, ToolStream, new_call_id

DONE = "data: [DONE]\n\n"
_MARK = "@@polymodal-delta-text@@"  # stands for the text in a chunk template


def sse(payload: Any) -> str:
    """One server-sent event carrying a JSON object (a pydantic model or a dict)."""
    body = (
        payload.model_dump_json(exclude_none=False)
        if hasattr(payload, "model_dump_json")
        else (json.dumps(payload))
    )
    return f"data: {body}\n\n"


def _ids(token_ids: list[int] | None) -> list[int] | None:
    """A copy of `token_ids` (None stays None: a prompt given as embeddings has none)."""
    return None if token_ids is None else list(token_ids)


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


@dataclass
class Shape:
    """How one request's outputs become choices."""

    kind: str  # "chat" | "completion"
    top_n: int | None = None  # top logprobs per token in the answer (None: no logprobs)
    n: int = 1  # choices returned per prompt (best_of may generate more)
    tool_mode: str | None = None  # None | "named" | "required" | "auto"
    tool_name: str | None = None  # the named function
    parser: ToolParser | None = None  # the auto tool-call parser
    parallel: bool = True  # auto: more than one tool call may be returned
    echo: list[str] = field(default_factory=list)  # text put before each prompt's choices
    echo_only: bool = False  # completions with echo and max_tokens 0: the prompt alone
    prompt_logprobs: int | None = None  # asked for: returned (vLLM's field)
    token_ids: bool = False  # vLLM's return_token_ids: prompt and choice token ids
    ids_as_tokens: bool = False  # vLLM's return_tokens_as_token_ids: logprobs' "token_id:N"
    request_id: str | None = None  # the caller's id: the response id is built from it
    reasoning: Reasoning | None = None  # chat with --reasoning-parser: thinking apart
    role: str = "assistant"  # a chat reply's role (vLLM's --response-role)
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: usage in every chunk
    cached_tokens: bool = False  # usage.prompt_tokens_details (--enable-prompt-tokens-details)

    def take_extras(
        self, body, reasoning_parser: str | None = None, header_id=None, ids_as_tokens=False
    ) -> None:
        """vLLM's per-request output extras of `body`: prompt logprobs, token ids, logprobs'
        tokens as ids (`ids_as_tokens`: the server's default), the caller's request id (the
        body's, else its `X-Request-Id` header: `header_id`); a chat's reasoning split."""
        self.prompt_logprobs = body.prompt_logprobs
        self.token_ids = bool(body.return_token_ids)
        given = body.return_tokens_as_token_ids
        self.ids_as_tokens = bool(ids_as_tokens if given is None else given)
        self.request_id = body.request_id or header_id
        options = body.stream_options
        self.continuous_usage = bool(
            options and options.include_usage and options.continuous_usage_stats
        )
        if reasoning_parser is not None:
            self.reasoning = Reasoning.for_request(
                reasoning_parser, body.chat_template_kwargs, body.include_reasoning
            )


def reply_parts(shape: Shape, text: str, reason: str | None):
    """(content, tool_calls, finish_reason) of a finished reply under `shape`'s tool mode."""
    mode = shape.tool_mode
    if mode == "named":
        call = {"id": new_call_id(), "type": "function"}
        call["function"] = {"name": shape.tool_name, "arguments": text}
        return None, [call], reason
    if mode == "required":
        calls, whole = required_reply(text)
        if not calls:  # cut short (length) before a call was named: the text is content
            return text, None, reason
        return None, calls, "tool_calls" if whole else reason
    if mode == "auto":
        content, calls = shape.parser.parse(text)
        if calls:
            return content, calls if shape.parallel else calls[:1], "tool_calls"
    return text, None, reason


class ResponseBuilder:
    """Builds the responses of one HTTP request (see `Shape`)."""

    def __init__(self, shape: Shape, model: str, tokenizer: Any):
        self.shape = shape
        self.kind = shape.kind
        self.id = new_id("chatcmpl" if shape.kind == "chat" else "cmpl", shape.request_id)
        self.created = now()
        self.model = model
        self.tokenizer = tokenizer
        self._namer = _IdTokens() if shape.ids_as_tokens else tokenizer  # logprobs' tokens
        self._started: set[int] = set()  # choices whose first chunk was sent
        self._finished: set[int] = set()
        self._streams: dict[int, ToolStream] = {}  # auto tool calling, per choice
        self._required: dict[int, RequiredCallStream] = {}  # "required" calls, per choice
        self._thinking: dict[int, ReasoningStream] = {}  # --reasoning-parser, per choice
        # A chunk that only carries text (no role, logprobs, finish reason or tool calls: all
        # but a choice's first and last) is a template per choice, the text put in place.
        # Pydantic built each one before: ~10x the time, per token of every stream.
        plain = shape.tool_mode is None if self.kind == "chat" else not shape.echo_only
        self._plain = (
            plain and shape.top_n is None and not shape.token_ids and not shape.continuous_usage
        )
        self._templates: dict[int, tuple[str, str] | None] = {}

    # ---- whole responses ----------------------------------------------------------------
    def full(self, outs: list[RequestOutput]):
        """The non-streamed response for finished requests (one per prompt)."""
        choices = []
        for p, out in enumerate(outs):
            for j, c in enumerate(self._returned(out.outputs)):
                index = p * self.shape.n + j
                choices.append(self._chat_choice(index, c) if self.kind == "chat" else
                               self._completion_choice(index, p, out, c))  # fmt: skip
        common = dict(
            id=self.id,
            created=self.created,
            model=self.model,
            usage=usage_info(outs, self.shape.cached_tokens),
        )
        if self.kind == "chat":
            plp = self._prompt_logprobs(outs[0]) if outs else None
            ids = outs[0].prompt_token_ids if outs and self.shape.token_ids else None
            return ChatCompletionResponse(
                choices=choices, prompt_logprobs=plp, prompt_token_ids=ids, **common
            )
        return CompletionResponse(choices=choices, **common)

    def _returned(self, seqs: list[CompletionOutput]) -> list[CompletionOutput]:
        """The `n` choices to return: with best_of, the most likely `n` (cumulative logprob)."""
        if len(seqs) <= self.shape.n:
            return seqs
        ranked = sorted(seqs, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
        return ranked[: self.shape.n]

    def _chat_choice(self, index: int, c: CompletionOutput) -> ChatChoice:
        thinking, text = None, c.text
        if self.shape.reasoning is not None:
            thinking, text = self.shape.reasoning.split(c.text)
            thinking = thinking if self.shape.reasoning.include else None
        content, calls, reason = reply_parts(
            self.shape, text or "", _finish_reason(c.finish_reason)
        )
        if text is None and not calls:
            content = None  # all thinking (cut short before its answer)
        if self.shape.echo and content is not None:
            content = self.shape.echo[0] + content
        message = ChatResponseMessage(role=self.shape.role, content=content, tool_calls=calls)
        message.reasoning_content = message.reasoning = thinking
        return ChatChoice(
            index=index,
            message=message,
            logprobs=self._logprobs(c.token_ids, c.logprobs),
            finish_reason=reason,
            stop_reason=c.stop_reason,
            token_ids=list(c.token_ids) if self.shape.token_ids else None,
        )

    def _completion_choice(self, index, p: int, out: RequestOutput, c: CompletionOutput):
        echo = self.shape.echo[p] if self.shape.echo else ""
        text = echo if self.shape.echo_only else echo + c.text
        token_ids, tables = c.token_ids, c.logprobs
        if self.shape.echo_only:
            token_ids, tables = [], []
        logprobs = None
        if self.shape.top_n is not None:
            if self.shape.echo and out.prompt_logprobs is not None:
                prompt = out.prompt_token_ids
                tables = [t or {} for t in out.prompt_logprobs] + list(tables or [])
                token_ids = prompt + list(token_ids)
            logprobs = self._logprobs(token_ids, tables)
        reason = "length" if self.shape.echo_only else _finish_reason(c.finish_reason)
        ids = self.shape.token_ids
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=reason,
            stop_reason=c.stop_reason,
            prompt_logprobs=self._prompt_logprobs(out),
            prompt_token_ids=_ids(out.prompt_token_ids) if ids else None,
            token_ids=([] if self.shape.echo_only else list(c.token_ids)) if ids else None,
        )

    def _prompt_logprobs(self, out: RequestOutput):
        if self.shape.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        return prompt_logprob_entries(self.tokenizer, out.prompt_logprobs)

    def _logprobs(self, token_ids, tables) -> dict[str, Any] | None:
        if self.shape.top_n is None or tables is None:
            return None
        fmt = chat_logprobs if self.kind == "chat" else completion_logprobs
        return fmt(self._namer, token_ids, tables, self.shape.top_n)

    # ---- streaming ----------------------------------------------------------------------
    def chunks(self, p: int, out: RequestOutput) -> list[str]:
        """SSE events for what one engine step added to prompt `p`'s request (one per choice)."""
        events = []
        usage = usage_info([out], self.shape.cached_tokens) if self.shape.continuous_usage else None
        for c in out.outputs:
            index = p * self.shape.n + c.index
            if index in self._finished:
                continue
            if (
                self._plain
                and c.delta_text
                and c.finish_reason is None
                and index in self._started
                and (index not in self._thinking or self._thinking[index].answering)
                and (template := self._template(index)) is not None
            ):
                events.append(template[0] + encode_basestring(c.delta_text) + template[1])
                continue
            token_ids, tables = delta_logprobs(c)
            logprobs = self._logprobs(token_ids, tables) if tables else None
            reason = _finish_reason(c.finish_reason)
            if reason is not None:
                self._finished.add(index)
            # return_token_ids: every step's new ids go out, with text or without (withheld)
            new_ids = list(c.delta_token_ids) if self.shape.token_ids else None
            if self.kind == "chat":
                thinking, text = self._split_thinking(index, c.delta_text, reason)
                delta, reason = self._chat_delta(index, text, reason)
                if thinking:
                    delta = delta or ChatResponseMessage()
                    delta.reasoning_content = delta.reasoning = thinking
                if delta is None and reason is None and logprobs is None and not new_ids:
                    continue
                delta = delta or ChatResponseMessage()
                if index not in self._started:
                    delta.role = self.shape.role
                    if self.shape.echo:
                        delta.content = self.shape.echo[0] + (delta.content or "")
                prompt_ids = None
                if self.shape.token_ids and not self._started:  # the response's first chunk
                    prompt_ids = list(out.prompt_token_ids)
                self._started.add(index)
                choice = ChatChunkChoice(
                    index=index, delta=delta, logprobs=logprobs, finish_reason=reason,
                    token_ids=new_ids,
                )  # fmt: skip
                events.append(sse(self._chat_chunk([choice], usage, prompt_ids)))
                continue
            text = "" if self.shape.echo_only else c.delta_text
            if index not in self._started and self.shape.echo:
                text = self.shape.echo[p] + text
            if not text and reason is None and logprobs is None and not new_ids:
                continue
            prompt_ids = None
            if self.shape.token_ids and index not in self._started:  # the choice's first chunk
                prompt_ids = _ids(out.prompt_token_ids)
            self._started.add(index)
            if self.shape.echo_only:
                logprobs, reason = None, ("length" if reason else None)
            choice = CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=reason,
                prompt_token_ids=prompt_ids, token_ids=new_ids,
            )  # fmt: skip
            events.append(sse(self._completion_chunk([choice], usage)))
        return events

    def _template(self, index: int) -> tuple[str, str] | None:
        """(before, after) the JSON string of the text in choice `index`'s text-only chunk,
        cut from the chunk pydantic builds (None: the cut is not clean; pydantic it is)."""
        if index not in self._templates:
            if self.kind == "chat":
                delta = ChatResponseMessage(content=_MARK)
                event = sse(self._chat_chunk([ChatChunkChoice(index=index, delta=delta)]))
            else:
                event = sse(self._completion_chunk([CompletionChoice(index=index, text=_MARK)]))
            before, mark, after = event.partition(json.dumps(_MARK))
            clean = mark and _MARK not in before + after
            self._templates[index] = (before, after) if clean else None
        return self._templates[index]

    def _split_thinking(self, index: int, text: str, reason: str | None) -> tuple[str, str]:
        """(reasoning, answer) of a chat choice's step (no reasoning parser: all answer)."""
        if self.shape.reasoning is None:
            return "", text
        stream = self._thinking.setdefault(index, self.shape.reasoning.stream())
        thinking, answer = stream.feed(text)
        if reason is not None:
            more, tail = stream.finish()
            thinking, answer = thinking + more, answer + tail
        return (thinking if self.shape.reasoning.include else ""), answer

    def _chat_delta(self, index: int, text: str, reason: str | None):
        """(delta message or None, finish reason) of one chat choice's step."""
        mode = self.shape.tool_mode
        if mode is None:
            return (ChatResponseMessage(content=text) if text else None), reason
        if mode == "named":
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if index not in self._started:
                call.update(id=new_call_id(), type="function")
                call["function"]["name"] = self.shape.tool_name
            elif not text:
                return None, reason
            return ChatResponseMessage(tool_calls=[call]), reason
        if mode == "required":
            return self._required_delta(index, text, reason)
        stream = self._streams.setdefault(index, ToolStream(self.shape.parser))
        content = stream.feed(text)
        if reason is None:
            return (ChatResponseMessage(content=content) if content else None), None
        tail, calls = stream.finish()
        content = (content + tail) or None
        calls = calls if self.shape.parallel else calls[:1]
        if calls:
            reason = "tool_calls"
        return ChatResponseMessage(content=content, tool_calls=_indexed(calls)), reason

    def _required_delta(self, index: int, text: str, reason: str | None):
        """A "required" choice's step: each call's id / name once known, then its arguments as
        they come. At the end, a list of calls finishes with "tool_calls"; an output cut short
        before any call was named goes out as content (as unstreamed: see `reply_parts`)."""
        stream = self._required.setdefault(index, RequiredCallStream())
        calls = stream.feed(text)
        if reason is not None:
            if not any(c.name is not None for c in stream.calls):
                return ChatResponseMessage(content=stream.text or None), reason
            reason = "tool_calls" if stream.is_valid() else reason
        return (ChatResponseMessage(tool_calls=calls) if calls else None), reason

    def usage_chunk(self, outs: list[RequestOutput]) -> str:
        """The last chunk of a stream with `stream_options.include_usage` (no choices)."""
        if self.kind == "chat":
            return sse(self._chat_chunk([], usage_info(outs, self.shape.cached_tokens)))
        return sse(self._completion_chunk([], usage_info(outs, self.shape.cached_tokens)))

    def _chat_chunk(self, choices, usage=None, prompt_token_ids=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
            prompt_token_ids=prompt_token_ids,
        )  # fmt: skip

    def _completion_chunk(self, choices, usage=None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


class _IdTokens:
    """Stands for the tokenizer in logprob tables under vLLM's `return_tokens_as_token_ids`:
    each token as "token_id:N" (a token whose bytes are not valid UTF-8 stays identifiable)."""

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(f"token_id:{t}" for t in ids)


def _indexed(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tool calls as stream deltas (each with its `index`)."""
    return [{"index": i, **call} for i, call in enumerate(calls)] if calls else None
