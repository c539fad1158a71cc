"""Request bodies of vLLM's pooling routes (`/v1/embeddings`, `/pooling`, `/classify`,
`/score`, `/rerank`), validated strictly like the generation requests: a field this server
does not implement is a 400 naming it. `docs/serving.md` lists the fields;
`tests/sdk/test_compat_table.py` keeps that table and these models in step.

`input` is checked here, not by pydantic's unions, so that a wrong type gets one clear
message naming `input` (or `input[i]`) instead of one line per union member.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError, field_validator

from polymodal.server.errors import RequestError
from polymodal.server.requests import ChatMessage, StrictBody


class _Truncated(StrictBody):
    """vLLM's `truncate_prompt_tokens`: a longer prompt keeps k tokens (-1: max_model_len)."""

    truncate_prompt_tokens: int | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keep(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value != -1:
            raise ValueError("a positive number of tokens, or -1 (max_model_len)")
        return value


class _InputRequest(_Truncated):
    """The fields every pooling route with an `input` shares."""

    model: str | None = None
    input: Any = None
    user: str | None = None  # metadata, not used (as in vLLM)
    add_special_tokens: bool = True

    def prompts(self) -> list[str | list[int]]:
        """`input` as a list of prompts: one string, strings, token ids or token-id lists."""
        return input_prompts(self.input, "input")


class _ChatInputRequest(_InputRequest):
    """A pooling request whose input may instead be one conversation (vLLM's chat form):
    `messages` rendered by the chat template (its own special tokens; `add_special_tokens`
    applies to `input`), with the template options of `/v1/chat/completions`."""

    messages: Any = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # the messages' media (max_pixels, ...)

    def prompts(self, convert=None) -> list[Any]:
        """`input`'s prompts, or the one conversation of `messages` (a prompt dict);
        `convert(messages)`: the chat route's checks of the messages as `ChatMessage`s (media
        under the server's policy: a multimodal embedding model's images)."""
        if self.messages is None:
            if self.mm_processor_kwargs is not None:
                raise RequestError(
                    "mm_processor_kwargs: applies to `messages` (their images)",
                    "mm_processor_kwargs",
                )
            if self.input is None:
                raise RequestError("input: give `input` (or `messages`)", "input")
            return input_prompts(self.input, "input")
        if self.input is not None:
            raise RequestError("messages: give `input` or `messages`, not both", "messages")
        if "add_special_tokens" in self.model_fields_set:
            raise RequestError(
                "add_special_tokens: applies to `input`; the chat template adds its own",
                "add_special_tokens",
            )
        if not isinstance(self.messages, list) or not self.messages:
            raise RequestError("messages: give a non-empty list of messages", "messages")
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or "role" not in message:
                raise RequestError(f"messages[{i}]: a message needs a role", f"messages[{i}]")
        messages = self.messages
        if convert is not None:
            messages = convert([_chat_message(m, i) for i, m in enumerate(messages)])
        template = {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "chat_template": self.chat_template,
            "chat_template_kwargs": self.chat_template_kwargs,
            "mm_processor_kwargs": self.mm_processor_kwargs,
        }
        return [{"messages": messages, **template}]


def _chat_message(message: dict, i: int) -> ChatMessage:
    """A pooling request's message checked as the chat route checks one (400 naming it)."""
    try:
        return ChatMessage.model_validate(message)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error.get("loc", ()))
        param = f"messages[{i}]" + (f".{where}" if where else "")
        raise RequestError(f"{param}: {error.get('msg')}", param) from None


class EmbeddingRequest(_ChatInputRequest):
    """OpenAI's `POST /v1/embeddings` (+ vLLM's `normalize`, `add_special_tokens`,
    `truncate_prompt_tokens`, chat-form `messages`)."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None


class PoolingRequest(_ChatInputRequest):
    """vLLM's `POST /pooling`: the model's pooled output as raw `data`. `task` "encode" is the
    head's raw output; the default is the model's own task (classify: probabilities, reward:
    rewards); "token_classify" / "token_embed": one weight / one vector per token (bge-m3's
    lexical weights / ColBERT vectors). `activation` / `normalize` switch the task's
    activation / L2 norm."""

    encoding_format: Literal["float", "base64"] = "float"
    task: (
        Literal["encode", "embed", "classify", "reward", "token_embed", "token_classify"] | None
    ) = None
    activation: bool | None = None
    normalize: bool | None = None


class ClassificationRequest(_ChatInputRequest):
    """vLLM's `POST /classify`: class probabilities and the top label per input (or for the
    one conversation of `messages`)."""

    activation: bool | None = None


class ScoreRequest(_Truncated):
    """vLLM's `POST /score`: `text_1` (one text or a list) against `text_2` (one or a list)."""

    model: str | None = None
    text_1: Any = None
    text_2: Any = None
    user: str | None = None
    activation: bool | None = None


class RerankRequest(_Truncated):
    """vLLM's (Jina / Cohere-style) `POST /rerank`: documents ordered by relevance to `query`;
    `top_n` keeps the best n (0 or unset: all)."""

    model: str | None = None
    query: Any = None
    documents: Any = None
    top_n: int | None = None
    user: str | None = None
    activation: bool | None = None
    return_documents: bool = True  # False: results carry no `document`


def input_prompts(value: Any, field: str) -> list[str | list[int]]:
    """A string, a list of strings, token ids or a list of token-id lists -> a list of
    prompts (strings or token-id lists); a 400 naming `field` otherwise."""
    if isinstance(value, str):
        items: list[Any] = [value]
        names = [field]
    elif isinstance(value, list) and value and all(_is_id(v) for v in value):
        items, names = [value], [field]
    elif isinstance(value, list):
        items, names = value, [f"{field}[{i}]" for i in range(len(value))]
    else:
        raise RequestError(
            f"{field}: give a string, a list of strings, token ids or a list of token-id lists "
            f"(got {'nothing' if value is None else type(value).__name__})",
            field,
        )
    if not items:
        raise RequestError(f"{field}: the list is empty; give at least one input", field)
    for item, name in zip(items, names):
        if isinstance(item, str):
            if not item:
                raise RequestError(f"{name}: the text is empty", name)
        elif isinstance(item, list):
            if not item:
                raise RequestError(f"{name}: the token-id list is empty", name)
            if not all(_is_id(t) for t in item):
                raise RequestError(f"{name}: token ids must be integers", name)
        else:
            raise RequestError(
                f"{name}: a string or a list of token ids, got {type(item).__name__}", name
            )
    return items


def texts(value: Any, field: str, many: bool = True) -> list[str]:
    """One text (or, with `many`, a non-empty list of them); a 400 naming `field` otherwise."""
    items = value if many and isinstance(value, list) else [value]
    if not items:
        raise RequestError(f"{field}: the list is empty; give at least one text", field)
    for i, item in enumerate(items):
        name = f"{field}[{i}]" if many and isinstance(value, list) else field
        if not isinstance(item, str):
            want = "a string or a list of strings" if many else "a string"
            got = "nothing" if item is None else type(item).__name__
            raise RequestError(f"{name}: {want}, got {got}", name)
        if not item:
            raise RequestError(f"{name}: the text is empty", name)
    return items


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
