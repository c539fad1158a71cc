"""OpenAI response models (and errors) of the server; the request bodies are in `requests.py`.

Field names and shapes follow the OpenAI API; vLLM's extras (`stop_reason`,
`prompt_logprobs`, ...) are added where vLLM adds them.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field, model_serializer

if TYPE_CHECKING:
    from polymodal.llm_core.outputs import RequestOutput


class ErrorInfo(BaseModel):
    """The body of an OpenAI error: what went wrong and which request field caused it."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`, the shape of every 4xx / 5xx answer."""

    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # --enable-prompt-tokens-details


def new_id(prefix: str, given: str | None = None) -> str:
    """An OpenAI-style object id, e.g. `chatcmpl-3f2a...` (`given`: the caller's request id
    after the prefix, as vLLM builds it)."""
    return f"{prefix}-{given or uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, the `created` field."""
    return int(time.time())


class _VllmExtras(BaseModel):
    """A response model whose vLLM extras (`_extras`) are left out while None, as vLLM leaves
    them out: a stream's chunks carry them only when asked for."""

    _extras: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler):
        data = handler(self)
        for key in self._extras:
            if data.get(key, 0) is None:
                del data[key]
        return data


class ChatResponseMessage(_VllmExtras):
    """The assistant message of a choice (or the delta of a streamed chunk). `tool_calls` are
    `{"id", "type": "function", "function": {"name", "arguments"}}` (deltas add `index`)."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # with --reasoning-parser: the thinking (DeepSeek's / SGLang's name, and vLLM's newer one)
    reasoning_content: str | None = None
    reasoning: str | None = None
    _extras = ("reasoning_content", "reasoning")


class ChatChoice(_VllmExtras):
    """One of the `n` answers of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token that ended it
    token_ids: list[int] | None = None  # vLLM: with return_token_ids
    _extras = ("token_ids",)


class ChatCompletionResponse(_VllmExtras):
    """Answer of a non-streamed chat completion."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM: when asked for
    prompt_token_ids: list[int] | None = None  # vLLM: with return_token_ids
    _extras = ("prompt_token_ids",)


class ChatChunkChoice(_VllmExtras):
    """One choice's delta in a streamed chunk."""

    index: int
    delta: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # vLLM: this chunk's new ids, with return_token_ids
    _extras = ("token_ids",)


class ChatCompletionChunk(_VllmExtras):
    """One `data: {...}` event of a streamed chat completion."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # vLLM: the first chunk, with return_token_ids
    _extras = ("prompt_token_ids",)


class CompletionChoice(_VllmExtras):
    """One answer of a (legacy) completion; also the streamed form."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM: when asked for
    # vLLM, with return_token_ids: the prompt's ids (a stream's first chunk) and the choice's
    # (a stream: each chunk's new ones)
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    _extras = ("prompt_token_ids", "token_ids")


class CompletionResponse(BaseModel):
    """Answer (or, with object `text_completion` chunks, a streamed event) of /v1/completions."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of `/v1/models`."""

    id: str
    object: str = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "polymodal"
    root: str | None = None  # the checkpoint (a LoRA adapter: its directory)
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Answer of `/v1/models`."""

    object: str = "list"
    data: list[ModelCard]


def usage_info(outs: list[RequestOutput], cached_tokens: bool = False) -> UsageInfo:
    """OpenAI usage summed over the engine requests of one HTTP request; `cached_tokens`:
    with the prompt tokens the prefix cache served (vLLM's `prompt_tokens_details`)."""
    prompt = sum(o.usage.prompt_tokens for o in outs)
    completion = sum(o.usage.completion_tokens for o in outs)
    usage = UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    if cached_tokens:
        cached = sum(o.num_cached_tokens or 0 for o in outs)
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached)
    return usage
