"""Structural tags (xgrammar's, vLLM's `structured_outputs.structural_tag`): a tag that must
open the output gives exactly `begin + content + end`; a tool-call tag triggered at least once
holds valid JSON between its begin and end; the older `structures` + `triggers` form lets free
text pass and holds what follows a trigger to the schema (checked on its grammar directly:
a random model seldom writes the trigger); malformed tags are refused naming the field."""

import json
import re

import pytest

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.llm_core.sampling_params import StructuredOutputsParams
from polymodal.llm_core.structured_output import GrammarState
from tests.helpers import tiny_checkpoint
from tests.sdk.test_structured_output import SCHEMA, satisfies

CALL = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
        "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2")), dtype="float32", device="cpu")


def _run(llm, tag, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=600, structured_outputs={
        "structural_tag": tag}, **kw)  # fmt: skip
    return llm.generate(["Answer:", "Call a tool."], params, use_tqdm=False)


def test_tag_that_opens_the_output(llm):
    content = {"type": "json_schema", "json_schema": SCHEMA, "max_whitespace_cnt": 2}
    tag = {
        "type": "structural_tag",
        "format": {"type": "tag", "begin": "<answer>", "content": content, "end": "</answer>"},
    }
    for out in _run(llm, json.dumps(tag)) + _run(llm, tag):  # JSON text or a dict
        text = out.outputs[0].text
        assert text.startswith("<answer>") and text.endswith("</answer>"), text
        assert satisfies(json.loads(text[len("<answer>") : -len("</answer>")]))
    regex = {
        "type": "structural_tag",
        "format": {
            "type": "sequence",
            "elements": [
                {"type": "const_string", "value": "id="},
                {"type": "regex", "pattern": "[0-9]{4}"},
            ],
        },
    }
    assert all(re.fullmatch(r"id=[0-9]{4}", o.outputs[0].text) for o in _run(llm, regex))


def test_triggered_tool_calls(llm):
    call = {"type": "json_schema", "json_schema": CALL, "max_whitespace_cnt": 2}
    tool = {"begin": "<tool>", "content": call, "end": "</tool>"}
    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool>"],
           "tags": [tool], "at_least_one": True, "stop_after_first": True}}  # fmt: skip
    for out in _run(llm, tag):
        calls = re.findall(r"<tool>(.*?)</tool>", out.outputs[0].text, re.S)
        assert len(calls) == 1 and isinstance(json.loads(calls[0])["n"], int)


def test_legacy_structures_hold_what_follows_a_trigger(llm):
    tag = {"structures": [{"begin": "<f>", "schema": CALL, "end": "</f>"}], "triggers": ["<f"]}
    grammar = llm.engine.compile_grammar(
        SamplingParams(structured_outputs=StructuredOutputsParams(structural_tag=tag))
    )
    tok = llm.tokenizer

    def accepts(text: str) -> bool:
        state = GrammarState(grammar)
        return all(state.accept(t) for t in tok.encode(text, add_special_tokens=False))

    assert accepts('free text first, then <f>{"n": 3}</f> and more text')
    assert not accepts('free text <f>{"n": "three"}</f>')  # a string where the schema says int
    assert not accepts("free text <f>not json")
    out = _run(llm, json.dumps(tag))  # free text passes until the model writes the trigger
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in out)


def test_bad_tags_refused(llm):
    cases = {
        "not valid JSON": "{not json",
        "a structural tag is a JSON object": "[1, 2]",
        "structures need begin, schema and end": {
            "structures": [{"begin": "<f>"}],
            "triggers": ["<f"],
        },
        "structural_tag cannot be compiled": {"type": "structural_tag", "format": {"type": "?"}},
    }
    for message, tag in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            _run(llm, tag)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(structural_tag="{}", regex="a")
