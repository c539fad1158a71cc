"""Streamed chunks: the text-only chunk template gives exactly the events pydantic builds;
"required" tool calls stream as they are generated, joined equal to the whole reply's calls."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from polymodal.llm_core.outputs import CompletionOutput, RequestOutput  # noqa: E402
from polymodal.server.responses import ResponseBuilder, Shape, sse  # noqa: E402

TEXTS = ["Hello", " wor", 'a "quoted" \\ back/slash', "line\nbreak\ttab\r", "\x00\x1f\x7f",
         "é中文😀", "\u2028\u2029\ufeff\ufffd", "@@polymodal-delta-text@@"]  # fmt: skip


def _out(texts: list[str], finish: str | None = None) -> RequestOutput:
    outputs = [CompletionOutput(i, t, [1], finish, None, None, t, [1]) for i, t in enumerate(texts)]
    return RequestOutput("r", [1, 2], outputs, finish is not None)


def _pydantic_events(builder: ResponseBuilder, p: int, out: RequestOutput) -> list[str]:
    """What `chunks` built before the template: each choice's chunk by pydantic."""
    builder._plain = False  # noqa: SLF001 - the reference path
    try:
        return builder.chunks(p, out)
    finally:
        builder._plain = True  # noqa: SLF001


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("n", [1, 2])
def test_text_chunks_equal_the_pydantic_chunks(kind, n):
    builder = ResponseBuilder(Shape(kind, n=n), "my-model", None)
    reference = ResponseBuilder(Shape(kind, n=n), "my-model", None)
    reference.id, reference.created = builder.id, builder.created
    for p in range(2):  # two prompts: choice p * n + i
        first = _out(["first"] * n)
        assert builder.chunks(p, first) == reference.chunks(p, first)  # role: pydantic's
        for text in TEXTS:
            step = _out([text] * n)
            fast = builder.chunks(p, step)
            assert fast == _pydantic_events(reference, p, step)
            for event in fast:
                assert event.startswith("data: ") and event.endswith("\n\n")
                json.loads(event[6:])
        last = _out(["end"] * n, finish="length")
        assert builder.chunks(p, last) == reference.chunks(p, last)
    assert builder._templates  # noqa: SLF001 - the template was used


def test_chunks_with_logprobs_or_tools_take_the_general_path():
    shape = Shape("chat", top_n=0)
    assert not ResponseBuilder(shape, "m", None)._plain  # noqa: SLF001
    shape = Shape("chat", tool_mode="named", tool_name="f")
    assert not ResponseBuilder(shape, "m", None)._plain  # noqa: SLF001
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'


def _joined(events: list[str]) -> dict[int, dict]:
    """Streamed tool-call deltas joined per call index: {index: {id, name, arguments}}."""
    calls: dict[int, dict] = {}
    for event in events:
        for delta in json.loads(event[6:])["choices"][0]["delta"].get("tool_calls") or ():
            call = calls.setdefault(delta["index"], {"arguments": ""})
            if "id" in delta:
                assert "id" not in call  # id, type and name come once, first
                call.update(id=delta["id"], name=delta["function"]["name"])
            call["arguments"] += delta["function"]["arguments"]
    return calls


def test_required_tool_calls_stream_incrementally_matching_the_whole_reply():
    text = (
        '[{"name": "f", "parameters": {"x": 1, "s": "a}, \\"b"}}, {"name": "g", "parameters": {}}]'
    )
    shape = Shape("chat", tool_mode="required")
    builder = ResponseBuilder(shape, "m", None)
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    events = []
    for i, piece in enumerate(pieces):
        events += builder.chunks(0, _out([piece], "stop" if i == len(pieces) - 1 else None))
    chunks = [json.loads(e[6:])["choices"][0] for e in events]
    assert chunks[0]["delta"]["role"] == "assistant" and chunks[-1]["finish_reason"] == "tool_calls"
    # each call's arguments come in several deltas, before the final chunk
    first = [c for c in chunks[:-1] for d in c["delta"]["tool_calls"] or () if d["index"] == 0]
    assert len(first) > 2 and all(c["finish_reason"] is None for c in first)
    calls = _joined(events)
    assert sorted(calls) == [0, 1] and calls[0]["id"] != calls[1]["id"]
    whole = ResponseBuilder(shape, "m", None).full([_out([text], "stop")])
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [c["function"] for c in message.tool_calls] == [
        {"name": calls[i]["name"], "arguments": calls[i]["arguments"]} for i in (0, 1)
    ]
    assert json.loads(calls[0]["arguments"]) == {"x": 1, "s": 'a}, "b'}


def test_required_tool_calls_cut_short_stream_as_unstreamed():
    shape = Shape("chat", tool_mode="required")
    text = '[{"name": "f", "parameters": {"x": 12, '
    for cut, content in [(text[:9], text[:9]), (text, None)]:
        events = []
        builder = ResponseBuilder(shape, "m", None)
        for i, ch in enumerate(cut):  # one character a step
            events += builder.chunks(0, _out([ch], "length" if i == len(cut) - 1 else None))
        last = json.loads(events[-1][6:])["choices"][0]
        whole = ResponseBuilder(shape, "m", None).full([_out([cut], "length")]).choices[0]
        assert last["finish_reason"] == whole.finish_reason == "length"
        assert whole.message.content == content and last["delta"].get("content") == content
        unstreamed = [c["function"] for c in whole.message.tool_calls or ()]
        streamed = [
            {"name": c["name"], "arguments": c["arguments"]} for c in _joined(events).values()
        ]
        assert streamed == unstreamed
    assert unstreamed == [{"name": "f", "arguments": '{"x": 12,'}]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_vllm_extras_are_left_out_unless_asked_for(kind):
    """`token_ids`, `prompt_token_ids`, `reasoning_content` / `reasoning`: absent from a stream
    that did not ask for them (as vLLM's), present in one that did."""
    events = ResponseBuilder(Shape(kind), "m", None).chunks(0, _out(["hi"], "stop"))
    for key in ("token_ids", "prompt_token_ids", "reasoning_content", "reasoning"):
        assert f'"{key}"' not in events[0]
    asked = Shape(kind, token_ids=True)
    event = json.loads(ResponseBuilder(asked, "m", None).chunks(0, _out(["hi"], "stop"))[0][6:])
    assert event["choices"][0]["token_ids"] == [1]
    assert (event if kind == "chat" else event["choices"][0])["prompt_token_ids"] == [1, 2]
