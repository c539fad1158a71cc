"""OpenAI's Responses API, `POST /v1/responses`, on the chat path: `input` (a string, or
message items whose parts are `input_text` / `input_image` / earlier `output_text`) and
`instructions` become chat messages (a system message first), `max_output_tokens`,
`temperature`, `top_p` and `text.format` (text, json_object, json_schema: structured output)
the sampling, and the reply a `reasoning` item (with `--reasoning-parser`), a `message` item of
`output_text` and a `function_call` item per tool call (function `tools`: responses_tools.py),
whole or streamed as the Responses events (responses_builder.py). With
`VLLM_ENABLE_RESPONSES_API_STORE=1`, responses are kept (`store`, default true) and
`previous_response_id` continues one; `GET` / `DELETE /v1/responses/{id}` (responses_store.py);
without it, `store: true` and `previous_response_id` are refused; `background: true` runs a
stored response while the POST answers `queued` (responses_background.py). `reasoning.effort`
is the chat template's `reasoning_effort`. Not run: `reasoning.summary`, tools other than
functions: each a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Discriminator, Field, Tag

from polymodal.llm_core.sampling_params import StructuredOutputsParams
from polymodal.server.errors import RequestError
from polymodal.server.reasoning import Reasoning
from polymodal.server.requests import (
    ChatMessage,
    ContentPart,
    ImageURL,
    StrictBody,
    build_sampling_params,
)
from polymodal.server.responses_background import BackgroundResponses
from polymodal.server.responses_builder import ResponsesBuilder
from polymodal.server.responses_store import ENV as STORE_ENV
from polymodal.server.responses_store import ResponseStore, store_enabled
from polymodal.server.responses_tools import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    call_messages,
    tool_setup,
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

    def check(self, stored: bool) -> None:
        """400 for what this server does not keep or run, naming the field (`stored`: the
        server keeps responses)."""
        why = f"responses are not stored (the server runs without {STORE_ENV}=1)"
        refused = {
            "store": (self.store and not stored, why + ": send the whole conversation"),
            "previous_response_id": (self.previous_response_id and not stored, why),
            "reasoning": (set(self.reasoning or {}) - {"effort"}, "only effort is supported"),
            "background": (self.background and (not stored or self.store is False or self.stream),
                           "needs the response store and store, and is not streamed"),
        }  # fmt: skip
        for name, (value, why) in refused.items():
            if value:
                raise RequestError(f"{name}: {why}", name)
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise RequestError("max_output_tokens must be at least 1", "max_output_tokens")

    def input_items(self) -> list:
        """`input` as items (a string: one user message)."""
        if isinstance(self.input, str):
            return [InputItem(role="user", content=self.input)]
        return list(self.input)

    def messages(self, prior: list | None = None) -> list[ChatMessage]:
        """`instructions`, then the items of the conversation so far (`prior`: a stored
        response's), then `input`, as chat messages."""
        items = [*(prior or ()), *self.input_items()]
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


def add_responses_route(
    router: APIRouter,
    engine,
    metrics,
    check_model,
    generates,
    prompt_of,
    defaults,
    parser=None,
    reasoning_parser: str | None = None,
    grammar_waits: bool = False,
):
    """Register `POST /responses` on `router` (the `/v1` one). `prompt_of(messages, tools)`:
    the engine prompt of chat messages (the server's template, media policy and audio check);
    `parser`: the server's tool-call parser (tool_choice "auto"); `reasoning_parser`: the
    server's (its replies' thinking as a `reasoning` item); `grammar_waits`: the engine holds
    grammars back until the reasoning ends (else a grammar leaves no room to think)."""

    store = ResponseStore() if store_enabled() else None
    jobs = BackgroundResponses(engine, store) if store is not None else None

    @router.post("/responses")
    async def responses(body: ResponsesRequest, request: Request):
        served = check_model(body.model)
        generates("/v1/responses")
        body.check(store is not None)
        prior = []
        if body.previous_response_id is not None:
            found = store.get(body.previous_response_id)
            if found is None:
                raise RequestError(
                    f"previous_response_id: no stored response {body.previous_response_id!r}",
                    "previous_response_id", "not_found", 404,
                )  # fmt: skip
            prior = found[1]
        params = body.sampling_params().with_defaults({"max_tokens": None, **defaults})
        params, shape, tools = tool_setup(body, params, parser)
        reasoning = None  # a grammar from the first token (no grammar_waits) leaves no room
        if reasoning_parser is not None and (params.structured_outputs is None or grammar_waits):
            reasoning = Reasoning.for_request(reasoning_parser, None, True)
        keep = None
        if store is not None and body.store is not False:
            items = [*prior, *body.input_items()]
            keep = lambda response: store.put(response, items + output_items(response))  # noqa: E731
        builder = ResponsesBuilder(body, served, shape, reasoning, on_done=keep)
        prompt = prompt_of(body.messages(prior), tools)
        effort = (body.reasoning or {}).get("effort")
        if effort is not None:  # the chat template's variable, as the chat route's
            if effort not in ("low", "medium", "high"):
                raise RequestError("reasoning.effort: low, medium or high", "reasoning")
            prompt["chat_template_kwargs"] = {"reasoning_effort": effort}
        if body.background:  # answered now; the store follows it (responses_background.py)
            return jobs.start(builder, prompt, params, [*prior, *body.input_items()])
        return await run_job(request, engine, metrics, "responses", [prompt], params, builder,
                             body.stream, False, "input")  # fmt: skip

    if store is not None:

        @router.get("/responses/{response_id}")
        async def get_response(response_id: str):
            found = store.get(response_id)
            if found is None:
                raise RequestError(f"no stored response {response_id!r}", "response_id",
                                   "not_found", 404)  # fmt: skip
            return found[0]

        @router.post("/responses/{response_id}/cancel")
        async def cancel_response(response_id: str):
            return jobs.cancel(response_id)

        @router.delete("/responses/{response_id}")
        async def delete_response(response_id: str):
            if not store.delete(response_id):
                raise RequestError(f"no stored response {response_id!r}", "response_id",
                                   "not_found", 404)  # fmt: skip
            return {"id": response_id, "object": "response", "deleted": True}


def output_items(response: dict) -> list:
    """A response's output as input items of the conversation it continues: its message and
    function calls (its reasoning is not sent back)."""
    items = []
    for item in response["output"]:
        if item["type"] == "message":
            parts = [InputPart(type="output_text", text=p.get("text", "")) for p in item["content"]]
            items.append(InputItem(role="assistant", content=parts))
        elif item["type"] == "function_call":
            fields = {k: item[k] for k in ("call_id", "name", "arguments")}
            items.append(FunctionCallItem(type="function_call", **fields))
    return items
