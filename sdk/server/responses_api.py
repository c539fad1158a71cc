"""OpenAI's Responses API, `POST /v1/responses`, on the chat path: `input` (a string, or
message items whose parts are `input_text` / `input_image` / earlier `output_text`) and
`instructions` become chat messages (a system message first), `max_output_tokens`,
`temperature`, `top_p` and `text.format` (text, json_object, json_schema: structured output)
the sampling, and the reply one `message` item of `output_text`, whole or streamed as the
Responses events (`response.created` ... `response.output_text.delta` ...
`response.completed`). Not kept: `store: true` and `previous_response_id` (responses are not
stored), `tools`, `reasoning`, `background`: each a 400 naming it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

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
from polymodal.server.serving import run_job


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


class ResponsesRequest(StrictBody):
    """The body of `POST /v1/responses` (the fields this server runs; the others refused)."""

    model: str | None = None
    input: str | list[InputItem]
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
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    truncation: Literal["disabled"] | None = None

    def check(self) -> None:
        """400 for what this server does not keep or run, naming the field."""
        refused = {
            "store": (self.store, "responses are not stored: send the whole conversation"),
            "previous_response_id": (self.previous_response_id, "responses are not stored"),
            "tools": (self.tools, "use /v1/chat/completions for tool calls"),
            "reasoning": (self.reasoning, "not supported"),
            "background": (self.background, "not supported"),
        }
        for name, (value, why) in refused.items():
            if value:
                raise RequestError(f"{name}: {why}", name)
        if self.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice: there are no tools here", "tool_choice")
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
        for item in items:
            content = item.content
            if not isinstance(content, str):
                content = [_part(p) for p in content]
            messages.append(ChatMessage(role=item.role, content=content))
        return messages

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
    stream's events for each step)."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.model = body, model
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self._sequence = 0
        self._started = False
        self._text = ""

    def _response(self, status: str, text: str | None, out: RequestOutput | None):
        item = {"type": "message", "id": self.message_id, "role": "assistant",
                "status": "in_progress" if text is None else "completed",
                "content": [] if text is None else [_text_part(text)]}  # fmt: skip
        usage = incomplete = None
        if out is not None:
            prompt, completion = out.usage.prompt_tokens, out.usage.completion_tokens
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": completion,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + completion}  # fmt: skip
            if out.outputs[0].finish_reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
                item["status"] = "incomplete"
        b = self.body
        fmt = (
            b.text.format.model_dump(by_alias=True, exclude_none=True)
            if b.text and b.text.format
            else None
        )
        return ResponseBody(
            id=self.id, created_at=self.created_at, status=status, model=self.model,
            output=[item] if text is not None or status == "in_progress" else [], usage=usage,
            incomplete_details=incomplete, instructions=b.instructions,
            max_output_tokens=b.max_output_tokens, temperature=b.temperature, top_p=b.top_p,
            metadata=b.metadata or {}, text={"format": fmt or {"type": "text"}},
        )  # fmt: skip

    def full(self, finals: list[RequestOutput]) -> ResponseBody:
        out = finals[0]
        return self._response("completed", out.outputs[0].text, out)

    def _event(self, kind: str, **payload) -> str:
        self._sequence += 1
        data = {"type": kind, "sequence_number": self._sequence, **payload}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunks(self, p: int, out: RequestOutput) -> list[str]:
        c, events = out.outputs[0], []
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        if not self._started:
            self._started = True
            response = self._response("in_progress", None, None).model_dump()
            response["output"] = []
            events.append(self._event("response.created", response=response))
            events.append(self._event("response.in_progress", response=response))
            item = {"type": "message", "id": self.message_id, "role": "assistant",
                    "status": "in_progress", "content": []}  # fmt: skip
            events.append(self._event("response.output_item.added", output_index=0, item=item))
            events.append(self._event("response.content_part.added", **where, part=_text_part("")))
        if c.delta_text:
            self._text += c.delta_text
            events.append(self._event("response.output_text.delta", **where, delta=c.delta_text))
        if out.finished:
            done = self._response("completed", self._text, out).model_dump()
            events.append(self._event("response.output_text.done", **where, text=self._text))
            events.append(
                self._event("response.content_part.done", **where, part=_text_part(self._text))
            )
            events.append(
                self._event("response.output_item.done", output_index=0, item=done["output"][0])
            )
            kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
            events.append(self._event(kind, response=done))
        return events

    def usage_chunk(self, finals: list[RequestOutput]) -> str:
        return ""  # the usage rides on response.completed


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def add_responses_route(
    router: APIRouter, engine, metrics, check_model, generates, prompt_of, defaults
):
    """Register `POST /responses` on `router` (the `/v1` one). `prompt_of(messages)`: the
    engine prompt of chat messages (the server's template, media policy and audio check)."""

    @router.post("/responses")
    async def responses(body: ResponsesRequest, request: Request):
        served = check_model(body.model)
        generates("/v1/responses")
        body.check()
        params = body.sampling_params().with_defaults({"max_tokens": None, **defaults})
        builder = ResponsesBuilder(body, served)
        prompt = prompt_of(body.messages())
        return await run_job(request, engine, metrics, "responses", [prompt], params, builder,
                             body.stream, False, "input")  # fmt: skip
