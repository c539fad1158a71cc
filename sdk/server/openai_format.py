"""Between OpenAI bodies and the engine: messages with a media policy, logprobs, errors."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.outputs import CompletionOutput
from polymodal.processors.chat import ITEM_OPTIONS, input_audio
from polymodal.server.errors import RequestError


@dataclass
class MediaPolicy:
    """Which media URLs a request may name: `data:` always; files and http(s) by opt-in."""

    allowed_media_dir: Path | None = None
    allow_http: bool = False
    allow_embeds: bool = False  # `image_embeds` parts (--enable-mm-embeds)

    def check(self, url: str, param: str) -> str:
        """The source to load for `url`, or `RequestError` naming `param` if not allowed."""
        if url.startswith("data:"):
            return url
        if url.startswith(("http://", "https://")):
            if self.allow_http:
                return url
            raise RequestError(
                "http(s) media URLs are disabled on this server (start it with --allow-http); "
                "send the media inline as a data: URL",
                param,
            )
        if "://" in url and not url.startswith("file://"):
            raise RequestError(f"unsupported media URL scheme in {url[:40]!r}", param)
        if self.allowed_media_dir is None:
            raise RequestError(
                "local media paths are disabled on this server (start it with "
                "--allowed-media-dir DIR); send the media inline as a data: URL",
                param,
            )
        raw = urllib.parse.unquote(url[len("file://") :]) if url.startswith("file://") else url
        path = Path(raw)
        if not path.is_absolute():
            path = self.allowed_media_dir / path
        resolved, root = path.resolve(), self.allowed_media_dir.resolve()
        if not resolved.is_relative_to(root):
            raise RequestError(f"media path {raw!r} is outside the allowed media directory", param)
        return str(resolved)


def engine_messages(
    messages: list[Any], policy: MediaPolicy, takes_audio: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """OpenAI chat messages (`requests.ChatMessage`) -> the message dicts `LLM.process` takes:
    media URLs checked against `policy`, per-part media options and `detail` kept, tool
    calls and tool results passed on to the chat template. An audio part is first handed to
    `takes_audio(where)`, which raises for a model without an audio encoder; `input_audio`
    is checked (format, base64) here."""
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        extra: dict[str, Any] = {}
        if message.name is not None:
            extra["name"] = message.name
        if message.tool_calls:
            if role != "assistant":
                raise RequestError("only assistant messages carry tool_calls", f"messages[{i}]")
            extra["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if role == "tool":
            if message.tool_call_id is None:
                raise RequestError(
                    "a tool message needs tool_call_id", f"messages[{i}].tool_call_id"
                )
            extra["tool_call_id"] = message.tool_call_id
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or "", **extra})
            continue
        parts = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise RequestError("a text part needs 'text'", f"{where}.text")
                parts.append({"type": "text", "text": part.text})
                continue
            if part.type in ("input_audio", "audio_url"):
                parts.append(_audio_part(part, where, policy, takes_audio))
                continue
            if part.type == "image_embeds":
                parts.append(_embeds_part(part, where, policy))
                continue
            url = part.image_url if part.type == "image_url" else part.video_url
            if url is None:
                raise RequestError(
                    f"a {part.type} part needs '{part.type}'", f"{where}.{part.type}"
                )
            source = policy.check(url.url, f"{where}.{part.type}.url")
            options = {k: getattr(part, k) for k in ITEM_OPTIONS if getattr(part, k) is not None}
            parts.append(
                {"type": part.type, part.type: {"url": source, "detail": url.detail}, **options}
            )
        out.append({"role": role, "content": parts, **extra})
    return out


def _embeds_part(part: Any, where: str, policy: MediaPolicy) -> dict[str, Any]:
    """An `image_embeds` part (vLLM's): its base64 tensors read (`weights_only`), as the
    engine's `{"image_embeds": rows, "image_grid_thw": grid}` source."""
    from polymodal.server.prompt_embeds import decode_tensor

    if not policy.allow_embeds:
        raise RequestError(
            "image_embeds parts need the server started with --enable-mm-embeds", where
        )
    value = part.image_embeds
    if value is None:
        raise RequestError("an image_embeds part needs 'image_embeds'", f"{where}.image_embeds")
    named = value if isinstance(value, dict) else {"image_embeds": value}
    given = {k: decode_tensor(v, f"{where}.image_embeds.{k}") for k, v in named.items()}
    return {"type": "image_embeds", "image_embeds": given}


def _audio_part(part: Any, where: str, policy: MediaPolicy, takes_audio) -> dict[str, Any]:
    """An `input_audio` / `audio_url` part, checked, as the engine's message part."""
    if takes_audio is not None:
        takes_audio(where)
    value = getattr(part, part.type)
    if value is None:
        raise RequestError(f"a {part.type} part needs '{part.type}'", f"{where}.{part.type}")
    if part.type == "input_audio":
        try:
            input_audio(value.model_dump(), f"{where}.input_audio")
        except InvalidInputError as exc:
            raise RequestError(str(exc), f"{where}.input_audio") from None
        return {"type": "input_audio", "input_audio": value.model_dump()}
    source = policy.check(value.url, f"{where}.audio_url.url")
    return {"type": "audio_url", "audio_url": {"url": source}}


_SAMPLING_PARAM = re.compile(r"SamplingParams\.(\w+)((?:\.\w+)*)")
# SamplingParams names that OpenAI spells differently (chat; without the request's own names)
_OPENAI_NAME = {"logprobs": "top_logprobs"}


def request_error(
    exc: Exception, default: str | None, fields: dict[str, str] | None = None
) -> tuple[str, str | None]:
    """(message, param) of an engine error in the request's own terms. The engine says
    `SamplingParams.x` (what `LLM` users pass); the answer names the request field that set x
    (`fields`: SamplingParams name -> request field, e.g. structured_outputs -> guided_regex;
    else the same name) in the message and as `param`; any other error is about `default`."""
    text = str(exc)
    if isinstance(exc, RequestError):
        return text, exc.param
    match = _SAMPLING_PARAM.search(text)
    if match is None:
        return text, default
    name, inner = match.groups()
    field = (_OPENAI_NAME if fields is None else fields).get(name, name)
    # structured_outputs.regex keeps its kind; guided_regex / response_format say it already
    said = field + inner if field == name else field
    return text[: match.start()] + said + text[match.end() :], field


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int
) -> dict[str, Any]:
    """`{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}` for chat choices."""
    content = []
    for token_id, table in zip(token_ids, logprobs):
        content.append(
            {
                **_token_entry(tokenizer, token_id, table.get(token_id, float("-inf"))),
                "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in _top(table, top_n)],
            }
        )
    return {"content": content}


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int
) -> dict[str, Any]:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    Each top_logprobs entry holds the `top_n` most likely tokens and the chosen one (OpenAI's
    "up to logprobs + 1"; vLLM's too); a token without a table (an echoed prompt's first)
    has None for both, as in vLLM.
    """
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, pos = [], 0
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    chosen, tops = [], []
    for token_id, table in zip(token_ids, logprobs):
        if not table:
            chosen.append(None)
            tops.append(None)
            continue
        top = _top(table, top_n)
        if token_id in table and all(t != token_id for t, _ in top):
            top.append((token_id, table[token_id]))
        chosen.append(max(table[token_id], -9999.0) if token_id in table else None)
        tops.append({tokenizer.decode([t]): max(lp, -9999.0) for t, lp in top})
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def delta_logprobs(out: CompletionOutput) -> tuple[list[int], list[dict[int, float]]]:
    """The token ids and logprob tables of a streamed output's latest delta."""
    k = len(out.delta_token_ids)
    if not k or not out.logprobs:
        return [], []
    return out.delta_token_ids, out.logprobs[-k:]


def _top(table: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:n]


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}


def prompt_logprob_entries(
    tokenizer: Any, tables: list[dict[int, float] | None]
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first is None) token id ->
    {"logprob", "decoded_token"}."""
    return [
        None
        if table is None
        else {
            str(t): {"logprob": max(lp, -9999.0), "decoded_token": tokenizer.decode([t])}
            for t, lp in table.items()
        }
        for table in tables
    ]
