"""`POST /v1/responses` on a server with `--reasoning-parser deepseek_r1`: the reply's thinking
is a `reasoning` item (a random model never closes its `<think>`: the whole reply is
reasoning, as the chat route's `reasoning_content`), whole and streamed."""

from __future__ import annotations

import pytest

from tests.sdk.server_process import openai_client, tiny_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "64", "--reasoning-parser",
                     "deepseek_r1") as url:  # fmt: skip
        yield url


def test_reasoning_item(server):
    c = openai_client(server)
    got = c.responses.create(model="m", input="Think.", max_output_tokens=6, temperature=0)
    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Think."}],
                                     max_tokens=6, temperature=0)  # fmt: skip
    thinking = chat.choices[0].message.model_extra["reasoning_content"]
    assert got.output[0].type == "reasoning"
    assert got.output[0].content[0].text == thinking
    events = list(c.responses.create(model="m", input="Think.", max_output_tokens=6,
                                     temperature=0, stream=True))  # fmt: skip
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == thinking
    assert events[-1].response.output[0].content[0].text == thinking
