"""OpenAI-style chat messages -> template-ready messages plus the media they reference, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polymodal.llm_core.errors import InvalidInputError

# Per-item options a content part may carry (qwen-vl-utils style), passed to preprocessing.
ITEM_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")


@dataclass
class MediaRef:
    """One media item named by a message part (or passed next to a raw prompt)."""

    modality: str  # "image" | "video"
    source: Any
    options: dict[str, Any] = field(default_factory=dict)


def _url_of(value: Any) -> Any:
    """`{"url": ...}` -> the url; anything else unchanged."""
    return value.get("url") if isinstance(value, dict) else value


def _part_media(part: dict[str, Any], where: str) -> MediaRef | None:
    """The media a content part references, or None for a text part."""
    kind = part.get("type")
    if kind is None:  # Qwen's own format: {"image": src} / {"video": src} / {"text": ...}
        kind = next(
            (k for k in ("image", "image_url", "video", "video_url", "text") if k in part), None
        )
    options = {key: part[key] for key in ITEM_OPTIONS if key in part}
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidInputError(f"{where}: a text part needs a string 'text'")
        return None
    if kind in ("image", "image_url", "video", "video_url"):
        source = part.get(kind, part.get("url"))
        source = _url_of(source)
        if source is None:
            raise InvalidInputError(f"{where}: a {kind!r} part needs a {kind!r} field")
        return MediaRef("image" if kind.startswith("image") else "video", source, options)
    raise InvalidInputError(f"{where}: unknown content part type {kind!r}")


def split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Messages for `apply_chat_template` (media parts reduced to `{"type": ...}`) and the media.

    Accepted parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": src}`,
    `{"type": "image_url", "image_url": {"url": ...}}`, `{"type": "video", "video": src}`
    (and `video_url`). Message content may also be a plain string.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
    template_messages, media = [], []
    for m_index, message in enumerate(messages):
        where = f"message {m_index + 1}"
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidInputError(f"{where}: expected a dict with 'role' and 'content'")
        content = message.get("content", "")
        if isinstance(content, str):
            template_messages.append({"role": message["role"], "content": content})
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
        template_messages.append({"role": message["role"], "content": parts})
    return template_messages, media
