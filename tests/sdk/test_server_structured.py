"""Structured output through the server with the official openai client: response_format
json_schema / json_object, vLLM's structured_outputs and guided_* spellings, streamed too."""

from __future__ import annotations

import json
import re

import pytest

from tests.sdk.server_process import openai_client, post, tiny_server
from tests.sdk.test_structured_output import SCHEMA, satisfies

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.timeout(300)
USER = [{"role": "user", "content": "Describe a cat as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "256") as url:
        yield url


def test_json_schema_output_parses_and_satisfies_the_schema(server):
    c = openai_client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}
    out = c.chat.completions.create(
        model="m", messages=USER, max_tokens=1500, temperature=0, response_format=fmt
    )
    assert out.choices[0].finish_reason == "stop"
    assert satisfies(json.loads(out.choices[0].message.content))
    stream = c.chat.completions.create(
        model="m", messages=USER, max_tokens=1500, temperature=0, response_format=fmt,
        stream=True,
    )  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == out.choices[0].message.content
    sampled = c.chat.completions.create(
        model="m", messages=USER, max_tokens=1500, temperature=1.0, seed=2, n=2,
        response_format=fmt,
    )  # fmt: skip
    assert all(satisfies(json.loads(ch.message.content)) for ch in sampled.choices)
    obj = c.completions.create(
        model="m", prompt="JSON:", max_tokens=1500, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert isinstance(json.loads(obj.choices[0].text), dict)


def test_vllm_spellings(server):
    c = openai_client(server)

    def chat(**extra):
        out = c.chat.completions.create(
            model="m", messages=USER, max_tokens=60, temperature=0, extra_body=extra
        )
        return out.choices[0].message.content

    assert re.fullmatch(r"\d{3}-[a-z]{3}", chat(structured_outputs={"regex": r"\d{3}-[a-z]{3}"}))
    assert chat(structured_outputs={"choice": ["alpha", "beta"]}) in ("alpha", "beta")
    assert chat(guided_choice=["left", "right"]) in ("left", "right")
    assert re.fullmatch(r"[xy]{5}", chat(guided_regex="[xy]{5}"))
    compact = {"json": SCHEMA, "disable_any_whitespace": True}
    assert satisfies(json.loads(chat(structured_outputs=compact)))
    assert satisfies(json.loads(chat(guided_json=SCHEMA, max_tokens=1500)))


def test_structural_tags(server):
    """vLLM's response_format structural_tag (xgrammar's form, and the older structures +
    triggers) and the top-level `structural_tag` field (JSON text)."""
    c = openai_client(server)
    fmt = {"type": "tag", "begin": "<a>", "end": "</a>",
           "content": {"type": "regex", "pattern": "[0-9]{3}"}}  # fmt: skip

    def chat(**extra):
        out = c.chat.completions.create(
            model="m", messages=USER, max_tokens=60, temperature=0, extra_body=extra
        )
        return out.choices[0].message.content

    assert re.fullmatch(r"<a>[0-9]{3}</a>", chat(response_format={
        "type": "structural_tag", "format": fmt}))  # fmt: skip
    tag = json.dumps({"type": "structural_tag", "format": fmt})
    assert re.fullmatch(r"<a>[0-9]{3}</a>", chat(structural_tag=tag))
    legacy = {"type": "structural_tag", "triggers": ["<f"],
              "structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}]}  # fmt: skip
    assert isinstance(chat(response_format=legacy), str)
    for extra, param in [
        ({"response_format": {"type": "structural_tag"}}, "response_format"),
        (
            {"response_format": {"type": "structural_tag", "format": fmt, "triggers": []}},
            "response_format",
        ),
        ({"structural_tag": "{oops"}, "structural_tag"),
        ({"structural_tag": tag, "guided_regex": "a"}, "guided_regex"),
    ]:
        resp = post(server, "/v1/chat/completions", {"messages": USER, **extra})
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"].startswith(param), resp.json()


def test_bad_or_conflicting_constraints_are_400s(server):
    cases = [
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ]
    for extra, param in cases:
        resp = post(server, "/v1/chat/completions", {"messages": USER, **extra})
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"].startswith(param), resp.json()
