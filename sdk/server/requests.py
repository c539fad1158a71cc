"""OpenAI request bodies (plus vLLM's extra fields), validated strictly: a field this server
does not implement is a 400 naming it, never silently ignored.

`docs/serving.md` lists every field; `tests/sdk/test_compat_table.py` keeps that table and
these models in step.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.chat import ITEM_OPTIONS
from polymodal.server.errors import RequestError
from polymodal.server.media_fields import MediaFields
from polymodal.server.structured_fields import StructuredFields


class StrictBody(BaseModel):
    """A request body (or part of one) that refuses fields it does not define: every request
    model of the server derives from it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(StrictBody):
    """`stream_options`: `include_usage` adds a last chunk with token counts; vLLM's
    `continuous_usage_stats` (with it) puts the counts so far in every chunk too."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class ImageURL(StrictBody):
    """`{"url": ..., "detail": ...}`; detail "low" caps the image at 512x512 pixels."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class AudioURL(StrictBody):
    """vLLM's `audio_url`: `{"url": ...}` (a data: URL, a path under --allowed-media-dir, or
    http(s) with --allow-http)."""

    url: str


class InputAudio(StrictBody):
    """OpenAI's `input_audio`: base64 `data` and its `format` ("wav", "mp3", ...)."""

    data: str
    format: str


class ContentPart(StrictBody):
    """One part of a message: text, an image URL, a video URL (+ qwen-vl-utils' per-item
    `min_pixels` / `max_pixels` / `fps` / `num_frames`), or audio (`input_audio`,
    `audio_url`)."""

    type: Literal["text", "image_url", "video_url", "input_audio", "audio_url", "image_embeds"]
    text: str | None = None
    # vLLM's (--enable-mm-embeds): base64 `torch.save` tensors, the rows alone or with the grid
    image_embeds: str | dict[str, str] | None = None
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None
    input_audio: InputAudio | None = None
    audio_url: AudioURL | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None
    num_frames: int | None = None


class FunctionCall(StrictBody):
    """A function call: its name and JSON-encoded arguments."""

    name: str
    arguments: str


class ToolCall(StrictBody):
    """A tool call of an assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictBody):
    """A chat message; `content` is a string or a list of parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(StrictBody):
    """A function the model may call: name, description, JSON-schema parameters."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    """`{"type": "function", "function": {...}}`."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    """`tool_choice` naming one function: the output is a call of it."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(StrictBody):
    """`response_format.json_schema`."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    """`{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`, or vLLM's
    `{"type": "structural_tag", "format": {...}}` (xgrammar's structural tag) and its older
    `{"type": "structural_tag", "structures": [...], "triggers": [...]}`."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


# Request fields that map one to one onto SamplingParams.
SAMPLING_NAMES = (
    "temperature top_p n stop seed presence_penalty frequency_penalty top_k min_p "
    "repetition_penalty ignore_eos stop_token_ids skip_special_tokens include_stop_str_in_output "
    "min_tokens allowed_token_ids bad_words prompt_logprobs truncate_prompt_tokens"
).split()
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


def build_sampling_params(fields: dict[str, Any], renames: dict[str, str]) -> SamplingParams:
    """SamplingParams(**fields); an invalid value is a RequestError naming the request field
    (`renames`: SamplingParams name -> the request's, e.g. chat's logprobs -> top_logprobs)."""
    try:
        return SamplingParams(**fields)
    except InvalidInputError as exc:
        match = _SAMPLING_FIELD.search(str(exc))
        if match is None:
            raise
        name = renames.get(match.group(1), match.group(1))
        raise RequestError(_SAMPLING_FIELD.sub(name, str(exc), count=1), name) from None


class _Request(StructuredFields, StrictBody):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata only
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    min_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None  # vLLM's: a structural tag's JSON text
    mm_processor_kwargs: dict[str, Any] | None = None
    # vLLM's output extras: the prompt's and each choice's token ids next to the text (streams:
    # the prompt's in the first chunk, each chunk's new ids); logprobs tokens as "token_id:N";
    # the response id built from the caller's id
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = None
    cache_salt: str | None = None  # prefix-cache blocks shared only with the same salt
    priority: int = 0  # with --scheduling-policy priority: lower first

    def prompt_extras(self) -> dict[str, Any]:
        """vLLM's request fields the engine reads from the prompt dict (set ones only)."""
        extras = {"cache_salt": self.cache_salt} if self.cache_salt is not None else {}
        return extras | ({"priority": self.priority} if self.priority else {})

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (max_tokens aside); request options
        that need one another are checked here, before any engine work."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options needs stream: true", "stream_options")
        unknown = sorted(set(self.mm_processor_kwargs or ()) - set(ITEM_OPTIONS))
        if unknown:
            raise RequestError(
                f"mm_processor_kwargs has unsupported key(s) {unknown}; supported: "
                f"{list(ITEM_OPTIONS)}", "mm_processor_kwargs",
            )  # fmt: skip
        fields = {k: getattr(self, k) for k in SAMPLING_NAMES if getattr(self, k) is not None}
        if self.logit_bias:
            try:
                fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise RequestError("logit_bias keys must be token ids", "logit_bias") from None
        structured = self.structured()
        if structured is not None:
            fields["structured_outputs"] = structured
        return fields

    def max_tokens_of(self, value: int | None, name: str) -> dict[str, Any]:
        """`{"max_tokens": value}` when set; 0 is refused naming the field (generation needs
        at least one token; vLLM's rule)."""
        if value is None:
            return {}
        if value < 1:
            raise RequestError(f"{name} must be at least 1, got {value}", name)
        return {"max_tokens": value}


class ChatCompletionRequest(MediaFields, _Request):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's chat extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # with --reasoning-parser; False: the answer alone
    documents: list[dict[str, Any]] | None = None  # the template's `documents` (RAG)
    add_special_tokens: bool = False  # tokenizing the rendered chat adds BOS & co.
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # a template variable
    media_io_kwargs: dict[str, dict[str, Any]] | None = None  # {"video": {"num_frames": N}}

    def template_kwargs(self) -> dict[str, Any] | None:
        """`chat_template_kwargs`, with `reasoning_effort` as a template variable when set."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {**(self.chat_template_kwargs or {}), "reasoning_effort": self.reasoning_effort}

    def sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams (raises InvalidInputError naming a bad field)."""
        fields = self.sampling_fields()
        if self.max_completion_tokens is not None:
            fields.update(self.max_tokens_of(self.max_completion_tokens, "max_completion_tokens"))
        else:
            fields.update(self.max_tokens_of(self.max_tokens, "max_tokens"))
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            raise RequestError(
                "continue_final_message continues the last message: it needs "
                "add_generation_prompt: false", "continue_final_message",
            )  # fmt: skip
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return build_sampling_params(fields, self.field_names())

    def field_names(self) -> dict[str, str]:
        names = {**super().field_names(), "logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        if self.tools and self.tool_choice not in (None, "none", "auto"):
            names["structured_outputs"] = "tools"  # the constraint is a tool's parameters
        return names


class CompletionRequest(_Request):
    """Body of `POST /v1/completions`: one prompt or several (strings or token-id lists), and
    vLLM's `prompt_embeds` (base64 tensors; after the prompts when both are given)."""

    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    prompt_embeds: str | list[str] | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    add_special_tokens: bool = True

    def with_extras(self, prompts: list) -> list:
        """`prompts` (texts or token-id lists) as prompt dicts carrying `prompt_extras`."""
        extras = self.prompt_extras()
        if not extras:
            return prompts
        key = lambda p: "prompt" if isinstance(p, str) else "prompt_token_ids"  # noqa: E731
        return [{**p, **extras} if isinstance(p, dict) else {key(p): p, **extras} for p in prompts]

    def prompts(self) -> list[str | list[int]]:
        """The prompts (texts or token-id lists), one per engine request; none when only
        `prompt_embeds` are given."""
        p = self.prompt
        if p is None:
            if self.prompt_embeds is None:
                raise RequestError("give prompt or prompt_embeds", "prompt")
            return []
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        for i, item in enumerate(p):
            if not item:
                where = f"prompt[{i}]"
                raise RequestError(f"{where} is empty: it needs text or token ids", where)
        return list(p)

    def sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams; max_tokens 0 is allowed with `echo` (the prompt only,
        as vLLM does)."""
        fields = self.sampling_fields()
        if self.max_tokens == 0 and self.echo:
            fields["max_tokens"] = 1  # generated, then dropped
        else:
            fields.update(self.max_tokens_of(self.max_tokens, "max_tokens"))
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
            if self.echo and "prompt_logprobs" not in fields:
                fields["prompt_logprobs"] = self.logprobs
        if self.best_of is not None:
            n = fields.get("n", 1)
            if n < 1:
                raise RequestError(f"n must be >= 1, got {n}", "n")
            if self.best_of < n:
                raise RequestError(f"best_of={self.best_of} must be >= n={n}", "best_of")
            if self.stream and self.best_of > n:
                raise RequestError("best_of > n cannot be streamed", "best_of")
            fields["n"] = self.best_of
            fields.setdefault("logprobs", 0)  # the cumulative logprob ranks them
        return build_sampling_params(fields, self.field_names())

    def field_names(self) -> dict[str, str]:
        return {**super().field_names(), **({"n": "best_of"} if self.best_of else {})}


class TokenizeRequest(StrictBody):
    """Body of `POST /tokenize` (vLLM's): a raw `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(StrictBody):
    """Body of `POST /detokenize` (vLLM's)."""

    model: str | None = None
    tokens: list[int]
