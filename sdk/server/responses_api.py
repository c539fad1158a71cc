"""OpenAI's Responses API, `POST /v1/responses`, on the chat path: `input` (a string, or
message items whose parts are `input_text` / `input_image` / earlier `output_text`) and
`instructions` become chat messages (a system message first), `max_output_tokens`,
`temperature`, `top_p` and `text.format` (text, json_object, json_schema: structured output)
the sampling, and the reply one `message` item of `output_text` (and a `function_call` item per
tool call: function `tools`, responses_tools.py), whole or streamed as the Responses events
(`response.created` ... `response.output_text.delta` ... `response.completed`; a call's
arguments in one `response.function_call_arguments.delta` at the end). Not kept: `store: true`
and `previous_response_id` (responses are not stored), `reasoning`, `background`, tools other
than functions: each a 400 naming it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Discriminator, Field, Tag

from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.sampling_params import StructuredOutputsParams
from polymodal.server.errors import RequestError
from polymodal.server.requests import (
    ChatMessage,
    ContentPart,
    ImageURL,
    StrictBody,
    build_sampling_params,
)
from polymodal.server.responses import reply_parts
from polymodal.server.responses_tools import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    call_item,
    call_messages,
    tool_setup,
)
from polymodal.server.serving import run_job
from polymodal.server.tools import ToolStream


class InputPart(StrictBody):
    """A part of an input message: text, an image (a URL or data: URL), or the text of an
    earlier reply (`output_text`, in a conversation passed whole)."""

    type: Literal["input_text", "input_image", "output_text"]
    text: str | None = None
    image_url: str | None = None
    detail: Literal["auto", "low", "high"] | None = None
    annotations: list[Any] | None = None  # output_text's, ignored with the reply it came with


class InputItem(StrictBody):
    """A message item of `input` (an earlier reply's item may keep its `id` and `status`)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class TextFormat(StrictBody):
    """`text.format`: plain text, any JSON object, or JSON matching `schema`."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(StrictBody):
    format: TextFormat | None = None


def _item_kind(value: Any) -> str:
    """An input item's type (a message item may leave it out)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind or "message"


Item = Annotated[
    Annotated[InputItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class ResponsesRequest(StrictBody):
    """The body of `POST /v1/responses` (the fields this server runs; the others refused)."""

    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: TextConfig | None = None
    user: str | None = None  # metadata only
    metadata: dict[str, str] | None = None  # returned with the response
    store: bool | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    truncation: Literal["disabled"] | None = None

    def check(self) -> None:
        """400 for what this server does not keep or run, naming the field."""
        refused = {
            "store": (self.store, "responses are not stored: send the whole conversation"),
            "previous_response_id": (self.previous_response_id, "responses are not stored"),
            "reasoning": (self.reasoning, "not supported"),
            "background": (self.background, "not supported"),
        }
        for name, (value, why) in refused.items():
            if value:
                raise RequestError(f"{name}: {why}", name)
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise RequestError("max_output_tokens must be at least 1", "max_output_tokens")

    def messages(self) -> list[ChatMessage]:
        """`instructions` and `input` as chat messages."""
        items = (
            [InputItem(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        messages = (
            [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        )
        calls: list = []  # a run of function_call / function_call_output items
        for item in items:
            if item.type != "message":
                calls.append(item)
                continue
            messages += call_messages(calls)
            calls = []
            content = item.content
            if not isinstance(content, str):
                content = [_part(p) for p in content]
            messages.append(ChatMessage(role=item.role, content=content))
        return messages + call_messages(calls)

    def sampling_params(self):
        fields = {
            k: getattr(self, k) for k in ("temperature", "top_p") if getattr(self, k) is not None
        }
        if self.max_output_tokens is not None:
            fields["max_tokens"] = self.max_output_tokens
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_object":
            fields["structured_outputs"] = StructuredOutputsParams(json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise RequestError("text.format json_schema needs a schema", "text")
            fields["structured_outputs"] = StructuredOutputsParams(json=fmt.schema_)
        return build_sampling_params(fields, {"max_tokens": "max_output_tokens"})


def _part(part: InputPart) -> ContentPart:
    if part.type == "input_image":
        if part.image_url is None:
            raise RequestError("an input_image part needs image_url", "input")
        return ContentPart(
            type="image_url", image_url=ImageURL(url=part.image_url, detail=part.detail)
        )
    return ContentPart(type="text", text=part.text or "")


class ResponseBody(BaseModel):
    """A Response object (`object: "response"`), whole or inside the stream's events."""

    id: str
    object: str = "response"
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    tool_choice: str = "auto"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    previous_response_id: str | None = None
    truncation: str = "disabled"


class ResponsesBuilder:
    """`run_job`'s builder for one Responses request: `full` (the Response) and `chunks` (the
    stream's events for each step). `shape` holds the tool mode the reply is parsed with."""

    def __init__(self, body: ResponsesRequest, model: str, shape=None):
        self.body, self.model, self.shape = body, model, shape
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self._sequence = 0
        self._started = self._message = False
        self._text = self._sent = ""
        mode = shape.tool_mode if shape is not None else None
        self._stream = ToolStream(shape.parser) if mode == "auto" else None
        self._held = mode in ("named", "required")  # the reply is the calls: nothing streams

    def _reply(self, text: str, reason: str | None) -> tuple[str | None, list]:
        """(content, tool calls) of the whole reply."""
        if self.shape is None or self.shape.tool_mode is None:
            return text, []
        content, calls, _ = reply_parts(self.shape, text, reason)
        return content, calls or []

    def _response(self, status: str, content: str | None, out: RequestOutput | None,
                  calls: list = ()):  # fmt: skip
        items = []
        if content is not None or not calls:
            items.append({"type": "message", "id": self.message_id, "role": "assistant",
                          "status": "in_progress" if status == "in_progress" else "completed",
                          "content": [] if content is None else [_text_part(content)]})  # fmt: skip
        items += [call_item(c) for c in calls]
        usage = incomplete = None
        if out is not None:
            prompt, completion = out.usage.prompt_tokens, out.usage.completion_tokens
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": completion,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + completion}  # fmt: skip
            if out.outputs[0].finish_reason == "length" and not calls:
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
                items[0]["status"] = "incomplete"
        b = self.body
        fmt = (
            b.text.format.model_dump(by_alias=True, exclude_none=True)
            if b.text and b.text.format
            else None
        )
        return ResponseBody(
            id=self.id, created_at=self.created_at, status=status, model=self.model,
            output=items if out is not None or status == "in_progress" else [], usage=usage,
            incomplete_details=incomplete, instructions=b.instructions,
            max_output_tokens=b.max_output_tokens, temperature=b.temperature, top_p=b.top_p,
            metadata=b.metadata or {}, text={"format": fmt or {"type": "text"}},
            tools=[t.model_dump(exclude_none=True) for t in b.tools or ()],
            tool_choice=b.tool_choice if isinstance(b.tool_choice, str) else "auto",
            parallel_tool_calls=b.parallel_tool_calls is not False,
        )  # fmt: skip

    def full(self, finals: list[RequestOutput]) -> ResponseBody:
        out = finals[0]
        content, calls = self._reply(out.outputs[0].text, out.outputs[0].finish_reason)
        return self._response("completed", content, out, calls)

    def _event(self, kind: str, **payload) -> str:
        self._sequence += 1
        data = {"type": kind, "sequence_number": self._sequence, **payload}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _content(self, delta: str) -> list[str]:
        """Events for a piece of the reply's text (the message item opened on the first)."""
        if not delta:
            return []
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        events = []
        if not self._message:
            self._message = True
            item = {"type": "message", "id": self.message_id, "role": "assistant",
                    "status": "in_progress", "content": []}  # fmt: skip
            events.append(self._event("response.output_item.added", output_index=0, item=item))
            events.append(self._event("response.content_part.added", **where, part=_text_part("")))
        self._sent += delta
        events.append(self._event("response.output_text.delta", **where, delta=delta))
        return events

    def chunks(self, p: int, out: RequestOutput) -> list[str]:
        c, events = out.outputs[0], []
        if not self._started:
            self._started = True
            response = self._response("in_progress", None, None).model_dump()
            response["output"] = []
            events.append(self._event("response.created", response=response))
            events.append(self._event("response.in_progress", response=response))
        self._text += c.delta_text
        if self._stream is not None:
            events += self._content(self._stream.feed(c.delta_text))
        elif not self._held:
            events += self._content(c.delta_text)
        if out.finished:
            events += self._finish(out)
        return events

    def _finish(self, out: RequestOutput) -> list[str]:
        """The closing events: the message's text done, each call's item and arguments, the
        response (completed, or incomplete when cut by max_output_tokens)."""
        content, calls = self._reply(self._text, out.outputs[0].finish_reason)
        if content is not None:  # what the stream held back (content before calls, all text)
            events = self._content(content[len(self._sent) :])
            if not self._message:  # an empty reply: its message item still opens
                events += self._content_open()
        else:
            events = []
        done = self._response("completed", content, out, calls).model_dump()
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        if content is not None:
            events.append(self._event("response.output_text.done", **where, text=content))
            events.append(
                self._event("response.content_part.done", **where, part=_text_part(content))
            )
            events.append(
                self._event("response.output_item.done", output_index=0, item=done["output"][0])
            )
        first = 1 if content is not None else 0
        for index, item in enumerate(done["output"][first:], first):
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            call = {"item_id": item["id"], "output_index": index}
            events.append(self._event("response.function_call_arguments.delta", **call,
                                      delta=item["arguments"]))  # fmt: skip
            events.append(self._event("response.function_call_arguments.done", **call,
                                      arguments=item["arguments"]))  # fmt: skip
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=done))
        return events

    def _content_open(self) -> list[str]:
        """The message item and its part opened for a reply with no text at all."""
        self._message = True
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        item = {"type": "message", "id": self.message_id, "role": "assistant",
                "status": "in_progress", "content": []}  # fmt: skip
        return [
            self._event("response.output_item.added", output_index=0, item=item),
            self._event("response.content_part.added", **where, part=_text_part("")),
        ]

    def usage_chunk(self, finals: list[RequestOutput]) -> str:
        return ""  # the usage rides on response.completed


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def add_responses_route(
    router: APIRouter, engine, metrics, check_model, generates, prompt_of, defaults, parser=None
):
    """Register `POST /responses` on `router` (the `/v1` one). `prompt_of(messages, tools)`:
    the engine prompt of chat messages (the server's template, media policy and audio check);
    `parser`: the server's tool-call parser (tool_choice "auto")."""

    @router.post("/responses")
    async def responses(body: ResponsesRequest, request: Request):
        served = check_model(body.model)
        generates("/v1/responses")
        body.check()
        params = body.sampling_params().with_defaults({"max_tokens": None, **defaults})
        params, shape, tools = tool_setup(body, params, parser)
        builder = ResponsesBuilder(body, served, shape)
        prompt = prompt_of(body.messages(), tools)
        return await run_job(request, engine, metrics, "responses", [prompt], params, builder,
                             body.stream, False, "input")  # fmt: skip
