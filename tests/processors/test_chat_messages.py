"""Chat messages -> template messages + media: `detail` as a pixel budget, tool calls kept."""

import pytest

from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.chat import DETAIL_MAX_PIXELS, split_messages


def _part(detail, **extra):
    return {"type": "image_url", "image_url": {"url": "x.png", "detail": detail}, **extra}


def test_detail_low_is_a_pixel_budget_and_high_keeps_the_models():
    _, (low,) = split_messages([{"role": "user", "content": [_part("low")]}])
    assert low.options == {"max_pixels": DETAIL_MAX_PIXELS["low"]} == {"max_pixels": 512 * 512}
    _, (tighter,) = split_messages([{"role": "user", "content": [_part("low", max_pixels=100)]}])
    assert tighter.options == {"max_pixels": 100}
    for detail in ("high", "auto", None):
        _, (ref,) = split_messages([{"role": "user", "content": [_part(detail)]}])
        assert ref.options == {} and ref.source == "x.png"
    with pytest.raises(InvalidInputError, match="detail must be one of"):
        split_messages([{"role": "user", "content": [_part("medium")]}])


def test_tool_calls_and_tool_results_reach_the_template():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    rendered, media = split_messages(messages)
    assert media == [] and rendered[0]["content"] == ""
    assert rendered[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}  # parsed for Jinja
    assert rendered[1] == {"role": "tool", "content": "done", "tool_call_id": "c1"}
    bad = {**call, "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(InvalidInputError, match="JSON object"):
        split_messages([{"role": "assistant", "tool_calls": [bad]}])
