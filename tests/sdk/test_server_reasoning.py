"""`--reasoning-parser` (deepseek_r1, qwen3): a chat reply's `<think>...</think>` apart from its
answer, whole and streamed (every way of cutting the text into deltas gives the same parts),
with tool calls parsed from the answer alone, `include_reasoning: false`, and qwen3's
`enable_thinking: false`."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from polymodal.llm_core.outputs import CompletionOutput, RequestOutput  # noqa: E402
from polymodal.server.reasoning import Reasoning  # noqa: E402
from polymodal.server.responses import ResponseBuilder, Shape  # noqa: E402
from polymodal.server.tools import TOOL_PARSERS  # noqa: E402

CASES = {  # reply -> (reasoning, answer)
    "<think>\nLet me see.\n</think>\n\nIt is 4.": ("\nLet me see.\n", "\n\nIt is 4."),
    "Template put <think> in the prompt.</think>Done": (
        "Template put <think> in the prompt.", "Done"),
    "<think>cut short while thinking <": ("cut short while thinking <", None),
    "</think>only an answer": (None, "only an answer"),
    "no tags at all": ("no tags at all", None),
    "<thinking> is not the tag</think>x": ("<thinking> is not the tag", "x"),
}  # fmt: skip


def _out(text: str, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", [1], [CompletionOutput(0, text, [1], finish, None, None, text, [1])],
                         finish is not None)  # fmt: skip


def _streamed(shape: Shape, pieces: list[str]) -> tuple[str, str]:
    builder = ResponseBuilder(shape, "m", None)
    reasoning, content = "", ""
    for i, piece in enumerate(pieces):
        for event in builder.chunks(0, _out(piece, "stop" if i == len(pieces) - 1 else None)):
            delta = json.loads(event[6:])["choices"][0]["delta"]
            assert delta.get("reasoning") == delta.get("reasoning_content")
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
    return reasoning, content


@pytest.mark.parametrize("text", sorted(CASES))
def test_whole_and_streamed_replies_split_alike(text):
    want = CASES[text]
    shape = Shape("chat", reasoning=Reasoning())
    message = ResponseBuilder(shape, "m", None).full([_out(text, "stop")]).choices[0].message
    assert (message.reasoning_content, message.content) == want
    assert message.reasoning == message.reasoning_content
    for size in (1, 2, 3, 5, len(text)):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert _streamed(Shape("chat", reasoning=Reasoning()), pieces) == (
            want[0] or "",
            want[1] or "",
        ), size


def test_answer_after_thinking_takes_the_fast_text_chunks():
    """Once a choice's reasoning ended, its text-only chunks use the template path."""
    builder = ResponseBuilder(Shape("chat", reasoning=Reasoning()), "m", None)
    for piece in ("<think>hm", "</think>", "a", "b"):
        builder.chunks(0, _out(piece))
    assert builder._templates  # noqa: SLF001


def test_include_reasoning_false_and_qwen3_without_thinking():
    text = "<think>secret</think>answer"
    dropped = Reasoning.for_request("deepseek_r1", None, include=False)
    message = (
        ResponseBuilder(Shape("chat", reasoning=dropped), "m", None)
        .full([_out(text, "stop")])
        .choices[0]
        .message
    )
    assert (message.reasoning_content, message.content) == (None, "answer")
    assert _streamed(Shape("chat", reasoning=dropped), list(text)) == ("", "answer")
    off = Reasoning.for_request("qwen3", {"enable_thinking": False}, include=None)
    assert off.split("plain answer") == (None, "plain answer")
    assert Reasoning.for_request("deepseek_r1", {"enable_thinking": False}, None).thinking


def test_tool_calls_are_parsed_from_the_answer_only():
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    text = f"<think>maybe {call} later</think>{call}"
    shape = Shape("chat", reasoning=Reasoning(), tool_mode="auto", parser=TOOL_PARSERS["hermes"])
    choice = ResponseBuilder(shape, "m", None).full([_out(text, "stop")]).choices[0]
    assert choice.message.reasoning_content == f"maybe {call} later"
    assert [c["function"]["name"] for c in choice.message.tool_calls] == ["f"]
    assert choice.finish_reason == "tool_calls"


def test_the_server_option_and_unknown_parsers():
    import argparse

    from polymodal.server.cli import serve_command

    parser = argparse.ArgumentParser()
    serve_command(parser)
    args = parser.parse_args(["m", "--reasoning-parser", "qwen3"])
    assert args.reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--reasoning-parser", "nope"])


def test_a_real_server_splits_free_replies_and_not_constrained_ones(tmp_path_factory):
    """`polymodal serve --reasoning-parser deepseek_r1`: a free reply of this random model has
    no `</think>`, so it is all reasoning (content null); a reply under response_format is all
    answer (the grammar left no room to think)."""
    openai = pytest.importorskip("openai")
    from tests.sdk.server_process import openai_client, tiny_server

    args = ("--num-kv-blocks", "128", "--reasoning-parser", "deepseek_r1")
    with tiny_server(tmp_path_factory, *args) as url:
        c = openai_client(url)
        user = [{"role": "user", "content": "Think, then answer."}]
        free = c.chat.completions.create(model="m", messages=user, max_tokens=8, temperature=0)
        message = free.choices[0].message
        assert message.content is None and message.reasoning_content
        assert message.reasoning == message.reasoning_content
        fmt = {"type": "json_object"}
        json_reply = c.chat.completions.create(
            model="m", messages=user, max_tokens=20, temperature=0, response_format=fmt
        )
        reply = json_reply.choices[0].message  # (cut at 20 tokens: a JSON object's start)
        assert getattr(reply, "reasoning_content", None) is None
        assert reply.content.lstrip().startswith("{")
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="m", messages=user, max_tokens=2,
                                      extra_body={"include_reasoning": "maybe"})  # fmt: skip
