"""Function tools in the Responses API (`POST /v1/responses`) through a real server and the
official client: a named tool_choice and "required" give `function_call` items with valid
arguments (whole and streamed), calls and their outputs sent back as input items reach the
template as the chat route's history does, other tool types are refused; "auto" (the server's
hermes parser) on a reply written as a model trained for it would."""

from __future__ import annotations

import json

import pytest

from polymodal.llm_core.outputs import CompletionOutput, RequestOutput
from polymodal.server.responses_api import ResponsesRequest
from polymodal.server.responses_builder import ResponsesBuilder
from polymodal.server.responses_tools import tool_setup
from polymodal.server.tools import TOOL_PARSERS
from tests.sdk.server_process import openai_client, post, tiny_server
from tests.sdk.test_server_tools import TOOLS, USER, valid_weather

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.timeout(300)
# the chat tools in the Responses API's flat form
FLAT = [{"type": "function", **t["function"]} for t in TOOLS]
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--num-kv-blocks", "256", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with tiny_server(tmp_path_factory, *args) as url:
        yield url


def _calls(response):
    return [item for item in response.output if item.type == "function_call"]


def test_named_and_required_calls(server):
    c = openai_client(server)
    named = c.responses.create(model="m", input=ASK, tools=FLAT, max_output_tokens=60,
                               tool_choice={"type": "function", "name": "get_weather"})  # fmt: skip
    (call,) = _calls(named)
    assert call.name == "get_weather" and valid_weather(call.arguments)
    assert call.call_id.startswith("call_") and named.output_text == ""
    required = c.responses.create(model="m", input=ASK, tools=FLAT, max_output_tokens=1000,
                                  tool_choice="required", temperature=0,
                                  parallel_tool_calls=False)  # fmt: skip
    (call,) = _calls(required)
    assert call.name in ("get_weather", "get_time") and required.status == "completed"
    assert isinstance(json.loads(call.arguments), dict)


def test_streamed_call_events_add_up(server):
    c = openai_client(server)
    args = dict(model="m", input=ASK, tools=FLAT, max_output_tokens=60, temperature=0,
                tool_choice={"type": "function", "name": "get_weather"})  # fmt: skip
    whole = c.responses.create(**args)
    events = list(c.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds  # the reply is the call
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas == [_calls(whole)[0].arguments]
    done = events[-1].response
    assert kinds[-1] == "response.completed" and _calls(done)[0].arguments == deltas[0]
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_call_history_reaches_the_template_as_the_chat_routes(server):
    c = openai_client(server)
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    items = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": arguments},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]  # fmt: skip
    got = c.responses.create(model="m", input=items, tools=FLAT, tool_choice="none",
                             max_output_tokens=3, temperature=0)  # fmt: skip
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]  # fmt: skip
    chat = c.chat.completions.create(model="m", messages=history, tools=TOOLS,
                                     tool_choice="none", max_tokens=3, temperature=0)  # fmt: skip
    assert got.usage.input_tokens == chat.usage.prompt_tokens
    assert got.output_text == chat.choices[0].message.content


def test_refused_tools(server):
    for tools, choice, param in (
        ([{"type": "web_search"}], None, "tools[0].type"),
        (None, "required", "tool_choice"),
        (FLAT, {"type": "function", "name": "nope"}, "tool_choice"),
    ):
        body = {"input": "hi", "max_output_tokens": 2, "tools": tools, "tool_choice": choice}
        bad = post(server, "/v1/responses", {k: v for k, v in body.items() if v is not None})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith(param), bad.text


def _output(text: str, finished: bool) -> RequestOutput:
    out = CompletionOutput(0, text, [1], "stop" if finished else None, delta_text=text)
    return RequestOutput("r", [1], [out], finished)


def test_auto_calls_parsed_from_the_reply_whole_and_streamed():
    body = ResponsesRequest(input=ASK, tools=FLAT)
    reply = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n' \
        "</tool_call>"  # fmt: skip
    _, shape, tools = tool_setup(body, __import__("polymodal").SamplingParams(),
                                 TOOL_PARSERS["hermes"])  # fmt: skip
    assert tools[0]["function"]["name"] == "get_weather"
    whole = ResponsesBuilder(body, "m", shape).full([_output(reply, True)])
    kinds = [item["type"] for item in whole.output]
    assert kinds == ["message", "function_call"]
    assert whole.output[0]["content"][0]["text"] == "Checking. "
    assert json.loads(whole.output[1]["arguments"]) == {"city": "Rome"}
    builder = ResponsesBuilder(body, "m", shape)
    events = []
    for i, ch in enumerate(reply):
        events += builder.chunks(0, _output(ch, i == len(reply) - 1))
    data = [json.loads(e.split("data: ", 1)[1]) for e in events]
    text = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert text == "Checking. "
    args = [d["delta"] for d in data if d["type"] == "response.function_call_arguments.delta"]
    assert [json.loads(a) for a in args] == [{"city": "Rome"}]
    assert data[-1]["response"]["output"][1]["name"] == "get_weather"


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_reasoning_item_before_the_message_and_calls(parser):
    """With a reasoning parser, the `<think>` part is a `reasoning` item first, whole and
    streamed (deltas adding up to it), then the message and the calls."""
    from polymodal.server.reasoning import Reasoning

    body = ResponsesRequest(input=ASK, tools=FLAT)
    _, shape, _ = tool_setup(body, __import__("polymodal").SamplingParams(),
                             TOOL_PARSERS["hermes"])  # fmt: skip
    reply = "<think>Paris: look it up.</think>Checking. <tool_call>\n" \
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # fmt: skip
    reasoning = Reasoning.for_request(parser, None, True)
    whole = ResponsesBuilder(body, "m", shape, reasoning).full([_output(reply, True)])
    assert [item["type"] for item in whole.output] == ["reasoning", "message", "function_call"]
    assert whole.output[0]["content"][0]["text"] == "Paris: look it up."
    assert whole.output[1]["content"][0]["text"] == "Checking. "
    builder = ResponsesBuilder(body, "m", shape, reasoning)
    events = []
    for i, ch in enumerate(reply):
        events += builder.chunks(0, _output(ch, i == len(reply) - 1))
    data = [json.loads(e.split("data: ", 1)[1]) for e in events]
    think = "".join(d["delta"] for d in data if d["type"] == "response.reasoning_text.delta")
    text = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert think == "Paris: look it up." and text == "Checking. "
    added = [(d["output_index"], d["item"]["type"]) for d in data
             if d["type"] == "response.output_item.added"]  # fmt: skip
    assert added == [(0, "reasoning"), (1, "message"), (2, "function_call")]

    def shown(items):  # ids are drawn per builder
        return [(i["type"], i.get("content"), i.get("name"), i.get("arguments")) for i in items]

    assert shown(data[-1]["response"]["output"]) == shown(whole.model_dump()["output"])
    assert [d["sequence_number"] for d in data] == list(range(1, len(data) + 1))
