"""OpenAI's Responses API (`POST /v1/responses`) through a real server and the official
client: the same answer as the chat route for the same messages (instructions as the system
message), streamed as the Responses events, images in input items, `text.format`, and the
fields it does not keep refused naming them."""

from __future__ import annotations

import pytest

from tests.sdk.server_process import openai_client, png_data_url, tiny_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "128") as url:
        yield url


def test_a_response_is_the_chat_answer(server):
    c = openai_client(server)
    system, user = "You describe animals.", "Describe a cat."
    got = c.responses.create(model="m", instructions=system, input=user, max_output_tokens=6,
                             temperature=0)  # fmt: skip
    chat = c.chat.completions.create(
        model="m", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
    )  # fmt: skip
    assert got.output_text == chat.choices[0].message.content
    assert got.object == "response" and got.id.startswith("resp_")
    length = chat.choices[0].finish_reason == "length"
    assert got.status == ("incomplete" if length else "completed")
    assert got.usage.input_tokens == chat.usage.prompt_tokens
    assert got.usage.output_tokens == chat.usage.completion_tokens


def test_streamed_events_add_up_to_the_response(server):
    c = openai_client(server)
    whole = c.responses.create(model="m", input="Once upon a time", max_output_tokens=8,
                               temperature=0)  # fmt: skip
    events = list(c.responses.create(model="m", input="Once upon a time", max_output_tokens=8,
                                     temperature=0, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_images_formats_and_refused_fields(server):
    c = openai_client(server)
    parts = [{"type": "input_image", "image_url": png_data_url()},
             {"type": "input_text", "text": "What is this?"}]  # fmt: skip
    with_image = c.responses.create(model="m", input=[{"role": "user", "content": parts}],
                                    max_output_tokens=2)  # fmt: skip
    text_only = c.responses.create(model="m", input="What is this?", max_output_tokens=2)
    assert with_image.usage.input_tokens > text_only.usage.input_tokens
    fmt = {"format": {"type": "json_object"}}
    json_reply = c.responses.create(model="m", input="JSON:", max_output_tokens=20, text=fmt)
    assert json_reply.output_text.lstrip().startswith("{")
    for field, value in (("store", True), ("previous_response_id", "resp_1")):
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model="m", input="hi", max_output_tokens=2, **{field: value})
        assert err.value.body["param"] == field
