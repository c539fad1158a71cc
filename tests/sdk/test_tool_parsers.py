"""Tool-call parsers (hermes, llama3_json, mistral, pythonic, llama4_pythonic, deepseek_v3,
phi4_mini_json): whole replies and streamed ones."""

import json

import pytest

from polymodal.server.required_calls import RequiredCallStream, required_reply
from polymodal.server.tools import TOOL_PARSERS, ToolStream

CALL = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
REPLIES = {
    "hermes": "Let me check.\n<tool_call>\n"
    + json.dumps(CALL)
    + "\n</tool_call>\n<tool_call>\n"
    + json.dumps({**CALL, "arguments": {"city": "Rome"}})
    + "\n</tool_call>",
    "llama3_json": "<|python_tag|>"
    + json.dumps({"name": "get_weather", "parameters": CALL["arguments"]})
    + "; "
    + json.dumps({"name": "get_weather", "parameters": {"city": "Rome"}}),
    "mistral": "Let me check.[TOOL_CALLS]"
    + json.dumps([CALL, {**CALL, "arguments": {"city": "Rome"}}]),
    "pythonic": '[get_weather(city="Paris", days=2), get_weather(city="Rome")]',
    "llama4_pythonic": '<|python_start|>[get_weather(city="Paris", days=2), '
    'get_weather(city="Rome")]<|python_end|>',
    "deepseek_v3": "Let me check.<｜tool▁calls▁begin｜>"
    + "".join(
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{json.dumps(a)}\n```"
        "<｜tool▁call▁end｜>"
        for a in (CALL["arguments"], {"city": "Rome"})
    )
    + "<｜tool▁calls▁end｜>",
    "phi4_mini_json": "Let me check. functools"
    + json.dumps([CALL, {"name": "get_weather", "parameters": {"city": "Rome"}}]),
}
# the text before the calls as written (vLLM's hermes / mistral / deepseek_v3 parsers); none
# for llama3_json and the pythonic ones (the calls are the whole reply)
CONTENT = {"hermes": "Let me check.\n", "llama3_json": None, "mistral": "Let me check.",
           "pythonic": None, "llama4_pythonic": None, "deepseek_v3": "Let me check.",
           "phi4_mini_json": "Let me check. "}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_whole_reply(name):
    content, calls = TOOL_PARSERS[name].parse(REPLIES[name])
    assert content == CONTENT[name]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    args = [json.loads(c["function"]["arguments"]) for c in calls]
    assert args == [CALL["arguments"], {"city": "Rome"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_plain_and_malformed_replies_are_content(name):
    parser = TOOL_PARSERS[name]
    assert parser.parse("Just text, no calls.") == ("Just text, no calls.", [])
    broken = parser.start + '{"name": "get_weather", "argu'
    assert parser.parse(broken) == (broken, [])


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_streamed_reply_char_by_char(name):
    stream = ToolStream(TOOL_PARSERS[name])
    sent = "".join(stream.feed(ch) for ch in REPLIES[name])
    tail, calls = stream.finish()
    assert sent + tail == (CONTENT[name] or "")  # the unstreamed content, spaces and all
    assert len(calls) == 2 and json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}
    # no part of the call text ever went out as content
    assert "get_weather" not in sent


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
@pytest.mark.parametrize("before", ["Checking. ", "\n\n", " "])
def test_streamed_content_before_calls_equals_the_unstreamed(name, before):
    if before.strip() and not TOOL_PARSERS[name].content_first:
        pytest.skip("the calls are the whole reply (text before them makes it content)")
    reply = before + REPLIES[name].split("Let me check.")[-1].lstrip()
    content, calls = TOOL_PARSERS[name].parse(reply)
    assert len(calls) == 2
    stream = ToolStream(TOOL_PARSERS[name])
    sent = "".join(stream.feed(ch) for ch in reply)
    tail, streamed = stream.finish()
    assert ((sent + tail) or None) == content
    spaces_only = not before.strip()
    blank = not TOOL_PARSERS[name].keeps_blank_content
    assert content == (None if spaces_only and blank else before)


def test_streamed_plain_text_is_all_content():
    for name in TOOL_PARSERS:
        stream = ToolStream(TOOL_PARSERS[name])
        text = "Sunny, 20 degrees <tool"  # ends like the start of a tag, but never is one
        sent = "".join(stream.feed(ch) for ch in text)
        tail, calls = stream.finish()
        assert sent + tail == text and calls == []


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "f", "parameters": {"a": [1, {"b": "}]"}], "c": null}}]',
        '[\n  {"parameters": {"x": "y"} , "name": "late"},\n  {"name": "g", "parameters": {}}\n]',
        '[{"name": "h\\"q", "parameters": {"t": "line\\nbreak \\\\"}}]',
    ],
)
def test_required_calls_stream_char_by_char_as_the_whole_reply(text):
    stream = RequiredCallStream()
    joined: dict[int, dict] = {}
    for ch in text:
        for delta in stream.feed(ch):
            call = joined.setdefault(delta["index"], {"name": None, "arguments": ""})
            if "id" in delta:
                call["name"] = delta["function"]["name"]
            call["arguments"] += delta["function"]["arguments"]
    whole, complete = required_reply(text)
    assert complete and [c["function"] for c in whole] == [joined[i] for i in sorted(joined)]
    assert [json.loads(c["function"]["arguments"]) for c in whole] == [
        c["parameters"] for c in json.loads(text)
    ]
    assert [c["function"]["name"] for c in whole] == [c["name"] for c in json.loads(text)]


def test_pythonic_literals_and_non_calls():
    parser = TOOL_PARSERS["pythonic"]
    reply = '[search(q="a b", tags=["x", "y"], opts={"k": 1.5, "on": True}, limit=None)]'
    content, calls = parser.parse(reply)
    assert content is None and calls[0]["function"]["name"] == "search"
    assert json.loads(calls[0]["function"]["arguments"]) == {
        "q": "a b", "tags": ["x", "y"], "opts": {"k": 1.5, "on": True}, "limit": None,
    }  # fmt: skip
    for text in ("[1] Introduction", '[f("positional")]', "[f(x=g())]", "[]", "Sure: [f(x=1)]"):
        assert parser.parse(text) == (text, []), text
    llama4 = TOOL_PARSERS["llama4_pythonic"]
    assert len(llama4.parse("[f(x=1)]")[1]) == 1  # bare, without the python tags
