"""Prompt building for text-only models: chat template or raw text -> token ids."""

from __future__ import annotations

from typing import Any

from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.chat import ChatTemplateOptions, split_messages
from polymodal.processors.types import ProcessedPrompt


class TextProcessor:
    """Tokenizes a raw prompt or renders chat messages through the checkpoint's template."""

    MODALITIES: tuple[str, ...] = ()  # the media kinds it takes: none

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images=(),
        videos=(),
        template: ChatTemplateOptions | None = None,
        **media_kwargs: Any,
    ) -> ProcessedPrompt:
        """One prompt from `messages` (OpenAI-style; text parts only) or a raw `prompt`;
        `template` says how messages are rendered (tools, another template, ...)."""
        if images or videos or _has_media(messages):
            raise InvalidInputError("this model is text-only: it takes no images or videos")
        if (messages is None) == (prompt is None):
            raise InvalidInputError("pass exactly one of messages= or prompt=")
        if messages is not None:
            flat = [_flatten(m) for m in messages]
            template = template or ChatTemplateOptions()
            text = template.render(self.tokenizer, flat)
            ids = self.tokenizer.encode(text, add_special_tokens=template.add_special_tokens)
        else:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            ids = self.tokenizer.encode(prompt)
        return ProcessedPrompt(token_ids=list(ids), positions=None, mrope_delta=0)


def _has_media(messages) -> bool:
    for message in messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            if any(isinstance(p, dict) and p.get("type", "text") != "text" for p in content):
                return True
    return False


def _flatten(message: dict) -> dict:
    """Join text parts so plain-string chat templates accept OpenAI-style content lists (one
    per line, as vLLM's and TensorRT-LLM's servers join them)."""
    if not isinstance(message, dict) or "role" not in message:
        raise InvalidInputError(f"each message needs a 'role' and 'content', got {message!r:.80}")
    (message,), _ = split_messages([message])  # tool calls parsed, content None -> ""
    content = message["content"]
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {**message, "content": content}
