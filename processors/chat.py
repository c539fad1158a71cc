"""OpenAI-style chat messages -> template-ready messages plus the media they reference, in order;
and the chat template rendering shared by the processors."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from polymodal.llm_core.errors import InvalidInputError

# Per-item options a content part may carry (qwen-vl-utils style), passed to preprocessing.
ITEM_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")
# OpenAI's `image_url.detail` as a pixel budget: "low" is OpenAI's 512x512 low-res mode;
# "auto" and "high" keep the model's own resize bounds.
DETAIL_MAX_PIXELS = {"low": 512 * 512, "high": None, "auto": None}
# Message keys kept for the chat template besides role and content (tool calling).
MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id")


@dataclass
class MediaRef:
    """One media item named by a message part (or passed next to a raw prompt)."""

    modality: str  # "image" | "video" | "audio"
    source: Any
    options: dict[str, Any] = field(default_factory=dict)


def _url_of(value: Any, options: dict[str, Any], where: str) -> Any:
    """`{"url": ..., "detail": ...}` -> the url (detail becomes a `max_pixels` option);
    anything else unchanged."""
    if not isinstance(value, dict):
        return value
    detail = value.get("detail")
    if detail is not None:
        if detail not in DETAIL_MAX_PIXELS:
            raise InvalidInputError(
                f"{where}: detail must be one of {sorted(DETAIL_MAX_PIXELS)}, got {detail!r}"
            )
        budget = DETAIL_MAX_PIXELS[detail]
        if budget is not None:
            options["max_pixels"] = min(options.get("max_pixels", budget), budget)
    return value.get("url")


# Content part types -> modality (OpenAI's `input_audio`, vLLM's `audio_url`, transformers'
# `audio`).
PART_MODALITY = {
    "image": "image",
    "image_url": "image",
    "image_embeds": "image",  # vLLM's: a vision tower's output (prompt_embeds.py)
    "video": "video",
    "video_url": "video",
    "audio": "audio",
    "audio_url": "audio",
    "input_audio": "audio",
}
# `input_audio.format` values (OpenAI's wav / mp3, and what our decoders read); the bytes are
# decoded by their content whatever the format says
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "mp4", "aac", "opus", "webm")


def input_audio(value: Any, where: str) -> bytes:
    """OpenAI's `{"data": <base64>, "format": "wav"}` -> the encoded bytes."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise InvalidInputError(f"{where}: input_audio needs {{'data': <base64>, 'format': ...}}")
    fmt = value.get("format")
    if fmt not in AUDIO_FORMATS:
        raise InvalidInputError(
            f"{where}: input_audio.format must be one of {list(AUDIO_FORMATS)}, got {fmt!r}"
        )
    try:
        data = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{where}: input_audio.data is not valid base64") from None
    if not data:
        raise InvalidInputError(f"{where}: input_audio.data is empty")
    return data


def part_modality(part: Any) -> str | None:
    """The modality a content part carries (None: text, or not a media part)."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type") or next((k for k in PART_MODALITY if k in part), None)
    return PART_MODALITY.get(kind)


def _part_media(part: dict[str, Any], where: str) -> MediaRef | None:
    """The media a content part references, or None for a text part."""
    kind = part.get("type")
    if kind is None:  # Qwen's own format: {"image": src} / {"video": src} / {"text": ...}
        kind = next((k for k in (*PART_MODALITY, "text") if k in part), None)
    options = {key: part[key] for key in ITEM_OPTIONS if key in part}
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidInputError(f"{where}: a text part needs a string 'text'")
        return None
    if kind == "image_embeds":  # {"image_embeds": rows, "image_grid_thw": grid}, or the rows
        given = part.get("image_embeds")
        given = given if isinstance(given, dict) else {"image_embeds": given}
        return MediaRef("image", given, options)
    if kind in ("image", "image_url", "video", "video_url"):
        source = part.get(kind, part.get("url", part.get("path")))  # transformers: url / path
        source = _url_of(source, options, where)
        if source is None:
            raise InvalidInputError(f"{where}: a {kind!r} part needs a {kind!r} field")
        return MediaRef("image" if kind.startswith("image") else "video", source, options)
    if kind == "input_audio":
        return MediaRef("audio", input_audio(part.get("input_audio"), where), options)
    if kind in ("audio", "audio_url"):
        source = _url_of(part.get(kind, part.get("url", part.get("path"))), options, where)
        if source is None:
            raise InvalidInputError(f"{where}: a {kind!r} part needs a {kind!r} field")
        return MediaRef("audio", source, options)
    raise InvalidInputError(f"{where}: unknown content part type {kind!r}")


def split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Messages for `apply_chat_template` (media parts reduced to `{"type": ...}`) and the media.

    Accepted parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": src}`,
    `{"type": "image_url", "image_url": {"url": ...}}`, `{"type": "video", "video": src}`
    (and `video_url`), `{"type": "input_audio", "input_audio": {"data": b64, "format": ...}}`,
    `{"type": "audio_url", "audio_url": {"url": ...}}`, `{"type": "audio", "audio": src}`.
    Message content may also be a plain string.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
    template_messages, media = [], []
    for m_index, message in enumerate(messages):
        where = f"message {m_index + 1}"
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidInputError(f"{where}: expected a dict with 'role' and 'content'")
        extra = {k: message[k] for k in MESSAGE_KEYS if message.get(k) is not None}
        if "tool_calls" in extra:
            extra["tool_calls"] = [_tool_call(call, where) for call in extra["tool_calls"]]
        content = message.get("content")
        if content is None or isinstance(content, str):
            template_messages.append({"role": message["role"], "content": content or "", **extra})
            continue
        if not isinstance(content, (list, tuple)):
            raise InvalidInputError(f"{where}: content must be a string or a list of parts")
        parts = []
        for p_index, part in enumerate(content):
            part_where = f"{where}, part {p_index + 1}"
            if not isinstance(part, dict):
                raise InvalidInputError(f"{part_where}: expected a dict, got {type(part).__name__}")
            ref = _part_media(part, part_where)
            if ref is None:
                parts.append({"type": "text", "text": part["text"]})
            else:
                media.append(ref)
                parts.append({"type": ref.modality})
        template_messages.append({"role": message["role"], "content": parts, **extra})
    return template_messages, media


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An assistant tool call with its JSON `arguments` string parsed into a dict, which is
    what chat templates (Llama 3's `tojson`, Qwen's) expect, as vLLM passes them."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise InvalidInputError(f"{where}: each tool call needs a 'function' object")
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise InvalidInputError(
                f"{where}: tool call arguments must be a JSON object, got {arguments[:60]!r}"
            ) from None
    return {**call, "function": function}


@dataclass
class ChatTemplateOptions:
    """How to render chat messages: the template (the checkpoint's unless given), tools,
    documents (retrieval-augmented templates' `documents` variable), extra template variables,
    whether to open an assistant turn, and whether tokenizing the rendered text adds the
    tokenizer's special tokens (vLLM's chat `add_special_tokens`, default False: the template
    writes them)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    documents: list[dict[str, Any]] | None = None
    add_special_tokens: bool = False

    def render(self, tokenizer: Any, messages: list[dict[str, Any]]) -> str:
        """The prompt text; errors name the option at fault."""
        if self.chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise InvalidInputError(
                "this checkpoint has no chat template: pass chat_template= or a raw prompt"
            )
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidInputError(
                "add_generation_prompt and continue_final_message cannot both be true"
            )
        reserved = {"messages", "tools", "chat_template", "add_generation_prompt", "tokenize",
                    "documents"}  # fmt: skip
        clash = sorted(reserved & set(self.chat_template_kwargs))
        if clash:
            raise InvalidInputError(f"chat_template_kwargs may not set {clash}")
        try:
            return tokenizer.apply_chat_template(
                messages,
                tools=self.tools,
                documents=self.documents,
                chat_template=self.chat_template,
                add_generation_prompt=self.add_generation_prompt,
                continue_final_message=self.continue_final_message,
                tokenize=False,
                **self.chat_template_kwargs,
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidInputError(f"the chat template failed: {exc}") from None
        except Exception as exc:  # jinja2 errors (undefined variables, syntax) and the like
            if type(exc).__module__.startswith("jinja2"):
                raise InvalidInputError(f"the chat template failed: {exc}") from None
            raise
