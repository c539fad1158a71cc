"""Tool calling through the server with the official openai client: a named tool_choice and
"required" (constrained to the tools' schemas), "auto" (the model's own <tool_call> text,
parsed; streamed as deltas), tools in the chat template, tool results as messages."""

from __future__ import annotations

import json

import pytest

from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import openai_client, post, running_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.timeout(300)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    args = ["--num-kv-blocks", "256", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with running_server(ckpt, tmp_path_factory.mktemp("log"), *args) as url:
        yield url


def valid_weather(arguments: str) -> bool:
    args = json.loads(arguments)
    return set(args) == {"city", "unit"} and args["city"] in ("Paris", "Rome", "Oslo")


def test_named_tool_call_returns_valid_arguments(server):
    c = openai_client(server)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = c.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=1000, temperature=0
    )
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and valid_weather(call.function.arguments)
    assert call.id.startswith("call_") and out.choices[0].message.content is None
    stream = c.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=1000,
        temperature=0, stream=True,
    )  # fmt: skip
    deltas = [d for ch in stream if ch.choices for d in ch.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_required_tool_choice_gives_calls_of_the_listed_tools(server):
    out = openai_client(server).chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=1000,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    stream = openai_client(server).chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=1000,
        temperature=0, parallel_tool_calls=False, stream=True,
    )  # fmt: skip
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    deltas = [d for ch in chunks[:-1] for d in ch.delta.tool_calls or ()]
    # as generated: the name first, then the arguments in several deltas before the end
    assert deltas[0].function.name == calls[0].function.name and deltas[0].id
    assert len([d for d in deltas if d.function.arguments]) > 1 and {d.index for d in deltas} == {0}
    last = chunks[-1].delta.tool_calls or ()
    assert "".join(d.function.arguments or "" for d in deltas + list(last)) == (
        calls[0].function.arguments
    )
    assert chunks[-1].finish_reason == "tool_calls"


HERMES = (
    r'Checking\. <tool_call>\n\{"name": "get_weather", "arguments": '
    r'\{"city": "(Paris|Rome)", "unit": "celsius"\}\}\n</tool_call>'
)


def test_auto_parses_the_models_own_tool_call_text(server):
    # a random model never writes <tool_call> by itself: a regex makes it (as if trained to)
    c = openai_client(server)
    args = dict(model="m", messages=USER, tools=TOOLS, max_tokens=200, temperature=0)
    out = c.chat.completions.create(**args, extra_body={"guided_regex": HERMES})
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Checking. "
    assert message.tool_calls[0].function.name == "get_weather"
    assert valid_weather(message.tool_calls[0].function.arguments)
    chunks = list(
        c.chat.completions.create(**args, stream=True, extra_body={"guided_regex": HERMES})
    )
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or ()]
    assert content == message.content and len(calls) == 1  # spaces kept, as vLLM's hermes
    assert calls[0].function.arguments == message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = c.chat.completions.create(**args, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None


def test_tools_reach_the_template_and_tool_results_are_accepted(server):
    c = openai_client(server)
    bare = c.chat.completions.create(model="m", messages=USER, max_tokens=1)
    with_tools = c.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    assert with_tools.usage.prompt_tokens > bare.usage.prompt_tokens + 50
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = c.chat.completions.create(
        model="m", messages=history, tools=TOOLS, tool_choice="none", max_tokens=3
    )
    assert out.usage.prompt_tokens > with_tools.usage.prompt_tokens
    prompt = post(server, "/tokenize", {"messages": history, "tools": TOOLS}).json()["tokens"]
    text = post(server, "/detokenize", {"tokens": prompt}).json()["prompt"]
    assert '"arguments": {"city": "Paris"' in text and "<tool_response>\nsunny, 21 C" in text
    bad = post(server, "/v1/chat/completions", {
        "messages": [*USER, {"role": "tool", "content": "x"}], "max_tokens": 1,
    })  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[1].tool_call_id"
    unknown = {"type": "function", "function": {"name": "nope"}}
    bad = post(server, "/v1/chat/completions", {
        "messages": USER, "tools": TOOLS, "tool_choice": unknown,
    })  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
