"""`tool_choice: "required"` output -> tool calls, whole or streamed as they are generated.

The constrained output is a JSON list `[{"name": ..., "parameters": {...}}, ...]` (vLLM's
shape). `RequiredCallStream` reads it one delta at a time with a small JSON scanner: a call's
`id` / `type` / `function.name` go out once its name string is closed, then its parameters'
text as it arrives (vLLM streams them the same way). A call's `arguments` are the exact text
of its `parameters` value, so the streamed fragments joined equal the unstreamed arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from polymodal.server.tools import new_call_id

_SPACE = " \t\n\r"


@dataclass
class _Call:
    """One call of the list, as far as it is read."""

    name: str | None = None
    args_start: int | None = None  # where the parameters value starts in the text
    args_end: int | None = None  # where it ends (None while it is open)
    closed: bool = False  # the call's object is closed
    announced: bool = False  # its id / type / name went out
    sent_to: int | None = None  # the text of its arguments sent up to here


class RequiredCallStream:
    """Reads one choice's "required" output; `feed` returns the tool-call deltas it allows."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[_Call] = []
        self._depth = 0  # brackets open: the list is 1, a call's object 2
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._expect = "key"  # inside a call object: key | colon | value | in_value | comma
        self._key: str | None = None  # the key whose value is read
        self._value_start = 0

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Add a text delta; the tool-call deltas (each with its `index`) to send now."""
        start = len(self.text)
        self.text += delta
        for pos in range(start, len(self.text)):
            self._scan(pos, self.text[pos])
        return self._deltas()

    def is_valid(self) -> bool:
        """Whether the whole text is a list of calls (False: cut short, e.g. by max_tokens)."""
        try:
            calls = json.loads(self.text)
        except ValueError:
            return False
        return isinstance(calls, list) and all(isinstance(c, dict) and "name" in c for c in calls)

    def whole_calls(self) -> list[dict[str, Any]]:
        """The calls read so far as OpenAI `tool_calls` (those with a name; an open one has
        the arguments text so far, as streamed)."""
        return [
            {"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": self._arguments(c)}}
            for c in self.calls
            if c.name is not None
        ]  # fmt: skip

    # ---- the scanner ----------------------------------------------------------------
    def _scan(self, pos: int, char: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
                if self._depth == 2:
                    self._string_closed(pos)
            return
        if char in _SPACE:
            return
        if self._depth == 2 and self._expect == "value":
            self._expect, self._value_start = "in_value", pos
            if self._key == "parameters":
                call = self.calls[-1]
                call.args_start = call.sent_to = pos
        if char == '"':
            self._in_string, self._string_start = True, pos
        elif char in "{[":
            self._depth += 1
            if self._depth == 2 and char == "{":
                self.calls.append(_Call())
                self._expect, self._key = "key", None
        elif char in "}]":
            if self._depth == 2:
                self._value_ended(pos)
                self.calls[-1].closed = True
            self._depth -= 1
        elif char == "," and self._depth == 2:
            self._value_ended(pos)
            self._expect = "key"
        elif char == ":" and self._depth == 2 and self._expect == "colon":
            self._expect = "value"

    def _string_closed(self, pos: int) -> None:
        """A string at the call object's level closed at `pos`: a key, or a whole value."""
        raw = self.text[self._string_start : pos + 1]
        if self._expect == "key":
            self._key, self._expect = json.loads(raw), "colon"
        elif self._expect == "in_value" and self._key == "name":
            self.calls[-1].name = json.loads(raw)

    def _value_ended(self, pos: int) -> None:
        """A `,` or `}` at `pos` ends the value being read (its trailing space not in it)."""
        if self._expect == "in_value" and self._key == "parameters":
            self.calls[-1].args_end = len(self.text[:pos].rstrip())
        self._expect = "comma"

    # ---- deltas -----------------------------------------------------------------------
    def _arguments(self, call: _Call) -> str:
        if call.args_start is None:
            return "{}" if call.closed else ""  # the schema requires parameters; just in case
        end = call.args_end if call.args_end is not None else len(self.text.rstrip())
        return self.text[call.args_start : end]

    def _deltas(self) -> list[dict[str, Any]]:
        deltas = []
        visible = len(self.text.rstrip())  # trailing space may end the value: held back
        for index, call in enumerate(self.calls):
            if call.name is None:
                continue  # a call goes out once its name is known
            fragment = ""
            if call.args_start is not None:
                end = call.args_end if call.args_end is not None else visible
                fragment = self.text[call.sent_to : end] if end > call.sent_to else ""
                call.sent_to = max(call.sent_to, end)
            elif call.closed and call.sent_to is None:
                fragment, call.sent_to = "{}", 0
            if not call.announced:
                call.announced = True
                function = {"name": call.name, "arguments": fragment}
                deltas.append({"index": index, "id": new_call_id(), "type": "function",
                               "function": function})  # fmt: skip
            elif fragment:
                deltas.append({"index": index, "function": {"arguments": fragment}})
        return deltas


def required_reply(text: str) -> tuple[list[dict[str, Any]], bool]:
    """(tool calls, whether the output is a whole list of calls) of a "required" output. One
    cut short (max_tokens) keeps the calls named so far, as streamed (OpenAI's way too)."""
    stream = RequiredCallStream()
    stream.feed(text)
    return stream.whole_calls(), stream.is_valid()
