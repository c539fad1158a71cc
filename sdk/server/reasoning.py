"""Reasoning parsers (vLLM's `--reasoning-parser`): a chat reply's thinking apart from its
answer, as `message.reasoning_content` (also under vLLM's newer name `reasoning`).

Both parsers read `<think>...</think>` (Qwen3, QwQ, DeepSeek-R1 and its distills): a leading
`<think>` is dropped (templates that put it in the prompt leave only `</think>` in the
output); the text before `</think>` is reasoning, the text after it the answer. Without a
`</think>` the whole output is reasoning (cut short while thinking), except for `qwen3` when the
request turned thinking off (`chat_template_kwargs: {"enable_thinking": false}`): then it is
all answer. Streams are split as they come, holding back text that may be the start of a tag
split across deltas. A request under a grammar (structured output, a named or required tool
choice) is split too: the server's engine holds the grammar back until `</think>`
(llm_core/structured_output.py), so the answer after it is what the grammar shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.llm_core.structured_output import REASONING_TAGS

PARSERS = tuple(REASONING_TAGS)  # each reads <think>...</think>
START, END = REASONING_TAGS["qwen3"]


@dataclass
class Reasoning:
    """How one request's replies are split: `thinking` False means no reasoning at all;
    `include` False (the request's `include_reasoning`) drops the reasoning from the reply."""

    thinking: bool = True
    include: bool = True

    @classmethod
    def for_request(cls, parser: str, chat_template_kwargs: dict | None, include: bool | None):
        kwargs = chat_template_kwargs or {}
        thinking = parser != "qwen3" or kwargs.get("enable_thinking", True) is not False
        return cls(thinking, include is not False)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, answer) of a whole reply; None for an empty part."""
        if not self.thinking:
            return None, text or None
        before, tag, rest = text.partition(START)
        text = rest if tag and not before.strip() else text
        reasoning, tag, answer = text.partition(END)
        if not tag:
            return (text or None), None
        return (reasoning or None), (answer or None)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """One streamed reply: `feed(delta)` -> (reasoning delta, answer delta); `finish()` flushes
    what was held back. `answering` once the reasoning ended (deltas are then all answer)."""

    def __init__(self, reasoning: Reasoning):
        self.answering = not reasoning.thinking
        self._held = ""  # text that may begin a tag
        self._started = False  # past a leading <think> (or text that is not one)

    def feed(self, delta: str) -> tuple[str, str]:
        if self.answering:
            return "", delta
        text = self._held + delta
        self._held = ""
        if not self._started:
            stripped = text.lstrip()
            if START.startswith(stripped):  # still maybe "<think>": wait
                self._held = text
                return "", ""
            if stripped.startswith(START):
                text = stripped[len(START) :]
            self._started = True
        reasoning, tag, answer = text.partition(END)
        if tag:
            self.answering = True
            return reasoning, answer
        keep = _partial_tag(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        """The held-back tail, as reasoning (a reply cut before its `</think>`)."""
        held, self._held = self._held, ""
        return ("", held) if self.answering else (held, "")


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that begins `</think>`."""
    for size in range(min(len(END) - 1, len(text)), 0, -1):
        if END.startswith(text[-size:]):
            return size
    return 0
