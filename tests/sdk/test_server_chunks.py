"""Streamed chunks: the text-only chunk template gives exactly the events pydantic builds."""

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
