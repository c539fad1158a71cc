"""OpenAI request / response models for `/v1/chat/completions` and `/v1/completions`.

Field names and shapes follow the OpenAI API; vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, ...) are accepted too. Unknown fields
are ignored, as OpenAI clients send optional fields this server does not use.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from polymodal.llm_core.sampling_params import SamplingParams


class ErrorInfo(BaseModel):
    """The body of an OpenAI error: what went wrong and which request field caused it."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`, the shape of every 4xx / 5xx answer."""

    error: ErrorInfo


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    def _sampling_fields(self) -> dict[str, Any]:
        names = (
            "temperature top_p n stop seed presence_penalty frequency_penalty top_k min_p "
            "repetition_penalty ignore_eos stop_token_ids skip_special_tokens "
            "include_stop_str_in_output"
        ).split()
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a last chunk with token counts."""

    include_usage: bool = False


class ImageURL(BaseModel):
    """`{"url": ..., "detail": ...}` of an `image_url` part (`detail` is accepted, unused)."""

    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    """One part of a message's content: text, an image URL or a video URL."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None


class ChatMessage(BaseModel):
    """A chat message; `content` is a string or a list of parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Request):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """The engine's SamplingParams (raises InvalidInputError naming a bad field)."""
        fields = self._sampling_fields()
        fields["max_tokens"] = self.max_completion_tokens or self.max_tokens or default_max_tokens
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**fields)


class CompletionRequest(_Request):
    """Body of `POST /v1/completions` (one prompt: a string or a list of token ids)."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False

    def sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """The engine's SamplingParams (OpenAI's default max_tokens for completions is 16)."""
        fields = self._sampling_fields()
        fields["max_tokens"] = self.max_tokens or default_max_tokens or 16
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        return SamplingParams(**fields)


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, the `created` field."""
    return int(time.time())


class ChatResponseMessage(BaseModel):
    """The assistant message of a choice (or the delta of a streamed chunk)."""

    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    """One of the `n` answers of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """Answer of a non-streamed chat completion."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    """One choice's delta in a streamed chunk."""

    index: int
    delta: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data: {...}` event of a streamed chat completion."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    """One answer of a (legacy) completion; also the streamed form."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


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
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Answer of `/v1/models`."""

    object: str = "list"
    data: list[ModelCard]
