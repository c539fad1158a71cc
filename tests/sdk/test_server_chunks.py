"""Streamed chunks: the text-only chunk template gives exactly the events pydantic builds;
"required" tool calls stream as indexed deltas equal to the whole reply's calls."""

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


def test_required_tool_calls_stream_as_indexed_deltas_matching_the_whole_reply():
    text = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]'
    shape = Shape("chat", tool_mode="required")
    builder = ResponseBuilder(shape, "m", None)
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    events = []
    for i, piece in enumerate(pieces):
        events += builder.chunks(0, _out([piece], "stop" if i == len(pieces) - 1 else None))
    assert len(events) == 1  # held back until the list is whole, then one delta
    choice = json.loads(events[0][6:])["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["delta"]["role"] == "assistant"
    calls = choice["delta"]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"x": 1}), ("g", {})
    ]  # fmt: skip
    whole = ResponseBuilder(shape, "m", None).full([_out([text], "stop")])
    assert [c["function"] for c in whole.choices[0].message.tool_calls] == [
        c["function"] for c in calls
    ]
    # cut short (length): not a list of calls, so the text is content, as unstreamed
    cut = ResponseBuilder(shape, "m", None).chunks(0, _out([text[:20]], "length"))
    choice = json.loads(cut[0][6:])["choices"][0]
    assert choice["delta"]["content"] == text[:20] and choice["finish_reason"] == "length"
