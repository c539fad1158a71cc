"""Function tools in the Responses API (`POST /v1/responses`), on the chat path's tool calling:
`tools` of `{"type": "function", "name", "description", "parameters", "strict"}`, `tool_choice`
("none", "auto": the server's --tool-call-parser, "required", `{"type": "function", "name"}`),
`parallel_tool_calls`; earlier calls and their results come back as `function_call` /
`function_call_output` input items (an assistant message with tool_calls, tool messages), and
the reply's calls go out as `function_call` output items (`call_id`, `name`, `arguments`).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from polymodal.server.errors import RequestError
from polymodal.server.requests import (
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    StrictBody,
    Tool,
    ToolCall,
)
from polymodal.server.responses import Shape
from polymodal.server.tools import tool_params


class FunctionTool(StrictBody):
    """A function the model may call (the Responses API's flat form)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionCallItem(StrictBody):
    """An earlier reply's call, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictBody):
    """A call's result."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


def call_messages(items: list) -> list[ChatMessage]:
    """Chat messages of a run of `function_call` / `function_call_output` items: consecutive
    calls are one assistant message with its tool_calls; each output is a tool message."""
    messages: list[ChatMessage] = []
    for item in items:
        if item.type == "function_call_output":
            messages.append(ChatMessage(role="tool", content=item.output,
                                        tool_call_id=item.call_id))  # fmt: skip
            continue
        call = ToolCall(
            id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments)
        )
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and last.tool_calls:
            last.tool_calls.append(call)
        else:
            messages.append(ChatMessage(role="assistant", tool_calls=[call]))
    return messages


class _ChatTools:
    """The chat request's tool fields, as `tools.tool_params` reads them."""

    def __init__(self, tools: list[FunctionTool], choice: Any, parallel: bool | None):
        self.tools = [
            Tool(function=FunctionDefinition(name=t.name, description=t.description,
                                             parameters=t.parameters, strict=t.strict))
            for t in tools
        ]  # fmt: skip
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise RequestError(
                    'tool_choice: "none", "auto", "required" or {"type": "function", "name"}',
                    "tool_choice",
                )
            choice = NamedToolChoice(function=NamedFunction(name=choice["name"]))
        self.tool_choice = choice
        self.parallel_tool_calls = True if parallel is None else parallel

    def chat_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template takes them."""
        return [t.model_dump(exclude_none=True) for t in self.tools]


def tool_setup(body, params, parser) -> tuple[Any, Shape, list | None]:
    """(sampling params, the chat `Shape` whose tool mode parses the reply, the tools for the
    chat template) of a Responses request with `tools`; without, the params unchanged."""
    shape = Shape("chat", None, 1)
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return params, shape, None
    chat = _ChatTools(body.tools, body.tool_choice, body.parallel_tool_calls)
    return tool_params(chat, params, shape, parser), shape, chat.chat_tools()


def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A `function_call` output item of a chat tool call."""
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": status}  # fmt: skip
