"""The Responses API's output (`POST /v1/responses`): the Response object and its stream of
events, built from the engine's outputs of one request.

A reply becomes, in order: a `reasoning` item (with the server's `--reasoning-parser`: the
`<think>` part, as `reasoning_text`), a `message` item (`output_text`; none when the reply is
only tool calls), one `function_call` item per tool call (responses_tools.py). Streamed, each
item is added when its first text comes (`response.reasoning_text.delta`,
`response.output_text.delta`), done when the next begins or the reply ends; a call's arguments
go out in one `response.function_call_arguments.delta` at the end. The text streamed equals
the whole reply's (the tool stream and the reasoning split hold back what may still change).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from polymodal.llm_core.outputs import RequestOutput
from polymodal.server.responses import reply_parts
from polymodal.server.responses_tools import call_item
from polymodal.server.tools import ToolStream


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
    store: bool = False


class ResponsesBuilder:
    """`run_job`'s builder for one Responses request: `full` (the Response) and `chunks` (the
    stream's events for each step). `shape` holds the tool mode the reply is parsed with;
    `reasoning` (a `reasoning.Reasoning`) splits its thinking apart."""

    def __init__(self, body, model: str, shape=None, reasoning=None, on_done=None):
        self.body, self.model, self.shape, self.reasoning = body, model, shape, reasoning
        self.on_done = on_done  # gets the final Response (a dict): the store keeps it
        self.id = f"resp_{uuid.uuid4().hex}"
        self.ids = {"message": f"msg_{uuid.uuid4().hex}", "reasoning": f"rs_{uuid.uuid4().hex}"}
        self.created_at = int(time.time())
        self._sequence = 0
        self._started = False
        self._text = ""  # the whole reply so far
        self._sent = {"message": "", "reasoning": ""}  # what each item streamed
        self._items: list[str] = []  # the kinds opened, in output order
        self._done: set[str] = set()  # ... and closed
        mode = shape.tool_mode if shape is not None else None
        self._tools = ToolStream(shape.parser) if mode == "auto" else None
        self._held = mode in ("named", "required")  # the reply is the calls: nothing streams
        self._thinking = reasoning.stream() if reasoning is not None else None

    # ---- the whole reply --------------------------------------------------------------------
    def _reply(self, text: str, reason: str | None) -> tuple[str | None, str | None, list]:
        """(reasoning, content, tool calls) of the whole reply."""
        thinking = None
        if self.reasoning is not None:
            thinking, text = self.reasoning.split(text)
            text = text or ""
        if self.shape is None or self.shape.tool_mode is None:
            return thinking, text, []
        content, calls, _ = reply_parts(self.shape, text, reason)
        return thinking, content, calls or []

    def _output(self, thinking, content, calls, status: str) -> list[dict[str, Any]]:
        items = []
        if thinking is not None:
            items.append({"type": "reasoning", "id": self.ids["reasoning"], "summary": [],
                          "content": [{"type": "reasoning_text", "text": thinking}],
                          "status": "completed"})  # fmt: skip
        if content is not None or not calls:
            items.append({"type": "message", "id": self.ids["message"], "role": "assistant",
                          "status": status, "content": [_text_part(content or "")]})  # fmt: skip
        return items + [call_item(c) for c in calls]

    def _response(self, status: str, out: RequestOutput | None, reply=None) -> ResponseBody:
        output, usage, incomplete = [], None, None
        if out is not None:
            thinking, content, calls = reply
            prompt, completion = out.usage.prompt_tokens, out.usage.completion_tokens
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": completion,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + completion}  # fmt: skip
            if out.outputs[0].finish_reason == "length" and not calls:
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            item_status = "incomplete" if status == "incomplete" else "completed"
            output = self._output(thinking, content, calls, item_status)
        b = self.body
        fmt = (
            b.text.format.model_dump(by_alias=True, exclude_none=True)
            if b.text and b.text.format
            else None
        )
        return ResponseBody(
            id=self.id, created_at=self.created_at, status=status, model=self.model,
            output=output, usage=usage, incomplete_details=incomplete,
            instructions=b.instructions, max_output_tokens=b.max_output_tokens,
            temperature=b.temperature, top_p=b.top_p, metadata=b.metadata or {},
            text={"format": fmt or {"type": "text"}},
            tools=[t.model_dump(exclude_none=True) for t in b.tools or ()],
            tool_choice=b.tool_choice if isinstance(b.tool_choice, str) else "auto",
            parallel_tool_calls=b.parallel_tool_calls is not False,
            previous_response_id=b.previous_response_id,
            store=self.on_done is not None,
        )  # fmt: skip

    def status_only(self, status: str) -> ResponseBody:
        """The response with `status` and no output yet (a background response's states)."""
        return self._response(status, None)

    def full(self, finals: list[RequestOutput]) -> ResponseBody:
        out = finals[0]
        reply = self._reply(out.outputs[0].text, out.outputs[0].finish_reason)
        done = self._response("completed", out, reply)
        if self.on_done is not None:
            self.on_done(done.model_dump())
        return done

    # ---- the stream -------------------------------------------------------------------------
    def _event(self, kind: str, **payload) -> str:
        self._sequence += 1
        data = {"type": kind, "sequence_number": self._sequence, **payload}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _where(self, kind: str) -> dict[str, Any]:
        return {"item_id": self.ids[kind], "output_index": self._items.index(kind),
                "content_index": 0}  # fmt: skip

    def _open(self, kind: str) -> list[str]:
        """Open the item `kind` (closing the reasoning when the message opens)."""
        if kind in self._items:
            return []
        events = self._close("reasoning") if kind == "message" else []
        self._items.append(kind)
        index = self._items.index(kind)
        if kind == "reasoning":
            item = {"type": "reasoning", "id": self.ids[kind], "summary": [], "content": [],
                    "status": "in_progress"}  # fmt: skip
            return events + [self._event("response.output_item.added", output_index=index,
                                         item=item)]  # fmt: skip
        item = {"type": "message", "id": self.ids[kind], "role": "assistant",
                "status": "in_progress", "content": []}  # fmt: skip
        return events + [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event("response.content_part.added", **self._where(kind), part=_text_part("")),
        ]

    def _close(self, kind: str, item: dict | None = None) -> list[str]:
        """The done events of an open item (its whole text as streamed)."""
        if kind not in self._items or kind in self._done:
            return []
        self._done.add(kind)
        text, where = self._sent[kind], self._where(kind)
        index = where["output_index"]
        if kind == "reasoning":
            item = item or {"type": "reasoning", "id": self.ids[kind], "summary": [],
                            "content": [{"type": "reasoning_text", "text": text}],
                            "status": "completed"}  # fmt: skip
            return [
                self._event("response.reasoning_text.done", **where, text=text),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
        return [
            self._event("response.output_text.done", **where, text=text),
            self._event("response.content_part.done", **where, part=_text_part(text)),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _send(self, kind: str, delta: str) -> list[str]:
        if not delta:
            return []
        events = self._open(kind)
        self._sent[kind] += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else (
            "response.output_text.delta")  # fmt: skip
        return events + [self._event(name, **self._where(kind), delta=delta)]

    def chunks(self, p: int, out: RequestOutput) -> list[str]:
        c, events = out.outputs[0], []
        if not self._started:
            self._started = True
            response = self._response("in_progress", None).model_dump()
            events.append(self._event("response.created", response=response))
            events.append(self._event("response.in_progress", response=response))
        self._text += c.delta_text
        thinking, answer = "", c.delta_text
        if self._thinking is not None:
            thinking, answer = self._thinking.feed(c.delta_text)
        events += self._send("reasoning", thinking)
        if self._tools is not None:
            answer = self._tools.feed(answer)
        if not self._held:
            events += self._send("message", answer)
        if out.finished:
            events += self._finish(out)
        return events

    def _finish(self, out: RequestOutput) -> list[str]:
        """The rest of the text (what the splits held back), every item done, each call's
        item and arguments, the response (completed, or incomplete when cut)."""
        reply = self._reply(self._text, out.outputs[0].finish_reason)
        thinking, content, calls = reply
        events = self._send("reasoning", (thinking or "")[len(self._sent["reasoning"]) :])
        if content is not None:
            events += self._send("message", content[len(self._sent["message"]) :])
            events += self._open("message")  # an empty reply still has its message
        done = self._response("completed", out, reply).model_dump()
        by_id = {item["id"]: item for item in done["output"]}
        events += self._close("reasoning", by_id.get(self.ids["reasoning"]))
        events += self._close("message", by_id.get(self.ids["message"]))
        index = len(self._items)
        for item in done["output"][index:]:
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
            index += 1
        kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=done))
        if self.on_done is not None:
            self.on_done(done)
        return events

    def usage_chunk(self, finals: list[RequestOutput]) -> str:
        return ""  # the usage rides on response.completed


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}
