"""Tool calling: `tool_choice` -> a structured-output constraint (named, required) and the
model's own tool-call text -> OpenAI `tool_calls` (auto), whole or streamed; `tool_params`
sets a chat request up for either.

Parsers (vLLM's `--tool-call-parser` names):

    hermes        Qwen2.5 / Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    llama3_json   Llama 3.x / 4: the reply is {"name": ..., "parameters": {...}} (several
                  separated by ";"), optionally after <|python_tag|>
    mistral       [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from polymodal.llm_core.sampling_params import StructuredOutputsParams
from polymodal.server.errors import RequestError


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """`{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}`."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def choice_constraint(tools: list, choice: Any, parallel: bool) -> StructuredOutputsParams | None:
    """The output constraint a `tool_choice` implies: a named function's parameters as a JSON
    schema; for "required", a list of calls (vLLM's shape: [{"name", "parameters"}, ...])."""
    if choice in (None, "none", "auto"):
        return None
    if choice == "required":
        variants = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
        if not parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)
    name = choice.function.name
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None:
        raise RequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return StructuredOutputsParams(json=tool.function.parameters or {"type": "object"})


class ToolParser:
    """Finds tool calls in a model's reply. `start` is the text that opens tool calls: content
    before it streams as content, everything from it on is held back and parsed at the end."""

    name = ""
    start = ""
    keeps_blank_content = True  # spaces alone before the calls are content
    content_first = True  # text may come before the calls

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of a whole reply; no calls -> (text, [])."""
        raise NotImplementedError

    def starts_calls(self, text: str) -> int | None:
        """Where tool calls begin in `text`, or None."""
        at = text.find(self.start)
        return None if at == -1 else at

    def content_before(self, text: str, at: int) -> str | None:
        """The content of a reply whose calls begin at `at`: the text before them as written,
        spaces kept (vLLM's hermes and mistral parsers), None when there is none (or only
        spaces, for a parser that does not keep them)."""
        content = text[:at]
        return content if content.strip() or (content and self.keeps_blank_content) else None


def _calls_from(objects: list[Any], key: str) -> list[dict[str, Any]]:
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or "name" not in obj:
            raise ValueError("not a tool call")
        calls.append(tool_call(obj["name"], obj.get(key, obj.get("arguments", {}))))
    return calls


class HermesParser(ToolParser):
    name, start = "hermes", "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        at = self.starts_calls(text)
        if at is None:
            return text, []
        try:
            calls = _calls_from([json.loads(m) for m in self._call.findall(text[at:])], "arguments")
        except (ValueError, TypeError):
            return text, []
        return self.content_before(text, at), calls


class Llama3JsonParser(ToolParser):
    name, start = "llama3_json", "<|python_tag|>"
    # vLLM's llama3_json parser: no content with calls (ours keeps text before a python tag)
    keeps_blank_content = False

    def starts_calls(self, text):
        at = text.find(self.start)
        if at != -1:
            return at
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None

    def parse(self, text):
        at = self.starts_calls(text)
        if at is None:
            return text, []
        body = text[at:].replace(self.start, "").strip()
        try:
            objects = [json.loads(part) for part in re.split(r"\s*;\s*(?=\{)", body) if part]
            calls = _calls_from(objects, "parameters")
        except (ValueError, TypeError):
            return text, []
        return self.content_before(text, at), calls


class MistralParser(ToolParser):
    name, start = "mistral", "[TOOL_CALLS]"

    def parse(self, text):
        at = self.starts_calls(text)
        if at is None:
            return text, []
        try:
            objects = json.loads(text[at + len(self.start) :].strip())
            calls = _calls_from(objects if isinstance(objects, list) else [objects], "arguments")
        except (ValueError, TypeError):
            return text, []
        return self.content_before(text, at), calls


class PythonicParser(ToolParser):
    """Llama 3.2 / Llama 4's pythonic calls (vLLM's `pythonic`): the whole reply is a Python list
    of calls with keyword arguments of literal values, `[get_weather(city="Paris", days=2)]`."""

    name, start = "pythonic", "["
    keeps_blank_content = False
    content_first = False  # calls are the whole reply: text before them makes it content
    wrapper = ("", "")  # markers around the list (llama4_pythonic's python tags)

    def starts_calls(self, text):
        stripped = text.lstrip()
        if stripped.startswith("[") or (self.wrapper[0] and stripped.startswith(self.start)):
            return len(text) - len(stripped)
        return None

    def parse(self, text):
        at = self.starts_calls(text)
        if at is None:
            return text, []
        body = text[at:].strip()
        opener, closer = self.wrapper
        if opener and body.startswith(opener):
            body = body[len(opener) :].removesuffix(closer).strip()
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                raise ValueError("not a list of calls")
            calls = [_python_call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError):
            return text, []
        return self.content_before(text, at), calls


class Llama4PythonicParser(PythonicParser):
    """Llama 4's pythonic calls, inside `<|python_start|>` ... `<|python_end|>` or bare."""

    name, start = "llama4_pythonic", "<|python_start|>"
    wrapper = ("<|python_start|>", "<|python_end|>")


def _python_call(node: ast.AST) -> dict[str, Any]:
    """A tool call from `name(key=literal, ...)` (no positional arguments, as vLLM's)."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError("not a call with keyword arguments")
    arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    return tool_call(node.func.id, arguments)


class DeepSeekV3Parser(ToolParser):
    """DeepSeek-V3 / R1's calls (vLLM's `deepseek_v3`): between its tool-call tokens, each
    `function<sep>NAME` then the arguments as a fenced JSON block."""

    name, start = "deepseek_v3", "<｜tool▁calls▁begin｜>"
    _call = re.compile(
        r"<｜tool▁call▁begin｜>(?P<type>.*?)<｜tool▁sep｜>(?P<name>.*?)\n```json\n"
        r"(?P<arguments>.*?)\n```<｜tool▁call▁end｜>",
        re.DOTALL,
    )

    def parse(self, text):
        at = self.starts_calls(text)
        if at is None:
            return text, []
        try:
            calls = [tool_call(m["name"].strip(), json.loads(m["arguments"]))
                     for m in self._call.finditer(text, at)]  # fmt: skip
        except (ValueError, TypeError):
            return text, []
        return (self.content_before(text, at), calls) if calls else (text, [])


class Phi4MiniJsonParser(ToolParser):
    """Phi-4-mini / Phi-4-multimodal's calls (vLLM's `phi4_mini_json`): `functools[{...}, ...]`,
    each with `name` and `arguments` (or `parameters`)."""

    name, start = "phi4_mini_json", "functools["
    keeps_blank_content = False

    def parse(self, text):
        at = self.starts_calls(text)
        if at is None:
            return text, []
        try:
            objects, _ = json.JSONDecoder().raw_decode(text, at + len(self.start) - 1)
            # each call's "parameters", else its "arguments"
            calls = _calls_from(objects if isinstance(objects, list) else [objects], "parameters")
        except (ValueError, TypeError):
            return text, []
        return self.content_before(text, at), calls


TOOL_PARSERS = {
    p.name: p
    for p in (
        HermesParser(), Llama3JsonParser(), MistralParser(), PythonicParser(),
        Llama4PythonicParser(), DeepSeekV3Parser(), Phi4MiniJsonParser(),
    )
}  # fmt: skip
# parsers whose start is a special token the detokenizer must keep
SPECIAL_START = ("mistral", "deepseek_v3", "llama4_pythonic")


@dataclass
class ToolStream:
    """Streams one choice of an auto tool-calling reply: content deltas until the parser's
    start text appears (text that may still become it is held back), then the calls at the
    end, one delta each. The content sent joined equals the unstreamed `content`."""

    parser: ToolParser
    text: str = ""
    sent: int = 0  # characters of `text` already sent as content
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, delta: str) -> str:
        """Add a text delta; the content that is safe to send now."""
        self.text += delta
        at = self.parser.starts_calls(self.text)
        if at is not None:
            return self._flush_content(at)
        hold = _partial_suffix(self.text, self.parser.start)
        if not self.parser.keeps_blank_content and not self.text[: len(self.text) - hold].strip():
            hold = len(self.text)  # only spaces yet: the reply may still open with calls
        return self._flush_until(len(self.text) - hold)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: (content not sent yet, tool calls)."""
        _, calls = self.parser.parse(self.text)
        if not calls:
            return self._flush_until(len(self.text)), []
        self.calls = calls
        return self._flush_content(self.parser.starts_calls(self.text)), calls

    def _flush_content(self, at: int) -> str:
        """Calls begin at `at`: the content before them not sent yet (the parser's
        `content_before`, so that streamed content equals the unstreamed reply's)."""
        if self.sent == 0 and self.parser.content_before(self.text, at) is None:
            self.sent = at  # (held back: leading space before llama3_json calls)
            return ""
        return self._flush_until(at)

    def _flush_until(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def tool_params(body, params, shape, parser):
    """A chat request's (`body`) sampling `params` with its tool calling set up on its response
    `shape` (`responses.Shape`): a constraint for a named / required tool_choice, the `parser`
    for "auto" (the default with tools, as in vLLM)."""
    choice = body.tool_choice or "auto"
    if choice == "none":
        return params
    if choice == "auto":
        if parser is None:
            raise RequestError(
                '"auto" tool choice needs a tool-call parser: start the server with '
                "--enable-auto-tool-choice --tool-call-parser {" + ",".join(TOOL_PARSERS) + "}, "
                'or send tool_choice "required", "none" or a named function',
                "tool_choice",
            )
        shape.tool_mode, shape.parser, shape.parallel = "auto", parser, body.parallel_tool_calls
        if parser.name in SPECIAL_START and "skip_special_tokens" not in params.model_fields_set:
            # [TOOL_CALLS] (and the like) is a special token: keep it in the text the parser reads
            return params.model_copy(update={"skip_special_tokens": False})
        return params
    if params.structured_outputs is not None:
        raise RequestError(
            "tool_choice required or a named function cannot be combined with another "
            "structured output constraint", "tool_choice",
        )  # fmt: skip
    constraint = choice_constraint(body.tools, choice, body.parallel_tool_calls)
    shape.tool_mode = "required" if choice == "required" else "named"
    shape.tool_name = None if choice == "required" else choice.function.name
    return params.model_copy(update={"structured_outputs": constraint})
