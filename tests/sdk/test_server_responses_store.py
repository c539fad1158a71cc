"""Stored responses (`VLLM_ENABLE_RESPONSES_API_STORE=1`) through a real server and the
official client: `previous_response_id` continues a conversation exactly as sending it whole
does (the earlier reply and function calls as assistant turns, the new instructions only),
streamed responses are stored too, `GET` / `DELETE /v1/responses/{id}`, unknown ids are 404s,
`store: false` keeps nothing."""

from __future__ import annotations

import pytest

from tests.sdk.server_process import API_KEY, openai_client, tiny_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.timeout(300)
ARGS = {"model": "m", "max_output_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        with tiny_server(tmp_path_factory, "--num-kv-blocks", "128") as url:
            yield url


def test_previous_response_continues_the_conversation(server):
    c = openai_client(server)
    first = c.responses.create(instructions="Be brief.", input="Name a color.", **ARGS)
    assert first.store is True
    follow = c.responses.create(previous_response_id=first.id, instructions="Answer again.",
                                input="And another?", **ARGS)  # fmt: skip
    whole = c.responses.create(instructions="Answer again.", store=False, input=[
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "And another?"}], **ARGS)  # fmt: skip
    assert follow.output_text == whole.output_text
    assert follow.usage.input_tokens == whole.usage.input_tokens
    assert follow.previous_response_id == first.id
    # a chain: the third turn sees both earlier ones
    third = c.responses.create(previous_response_id=follow.id, input="Last one.", **ARGS)
    longer = third.usage.input_tokens - follow.usage.input_tokens
    assert longer > 0 and third.previous_response_id == follow.id

    got = c.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(previous_response_id=first.id, input="x", **ARGS)
    import httpx

    again = httpx.delete(f"{server}/v1/responses/{first.id}", timeout=30,
                         headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert again.status_code == 404
    # follow's conversation is its own copy: deleting first does not break it
    assert c.responses.create(previous_response_id=follow.id, input="x", **ARGS).output_text


def test_streamed_and_unstored_responses(server):
    c = openai_client(server)
    events = list(c.responses.create(input="Once upon a time", stream=True, **ARGS))
    done = events[-1].response
    assert c.responses.retrieve(done.id).output_text == done.output_text
    kept_out = c.responses.create(input="hi", store=False, **ARGS)
    assert kept_out.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(kept_out.id)


def test_background_responses(server):
    import time

    c = openai_client(server)
    queued = c.responses.create(input="Name a color.", background=True, **ARGS)
    assert queued.status == "queued" and queued.output == []
    deadline = time.monotonic() + 60
    while (got := c.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, got.status
        time.sleep(0.1)
    want = c.responses.create(input="Name a color.", store=False, **ARGS)
    assert got.status == want.status and got.output_text == want.output_text
    with pytest.raises(openai.BadRequestError, match="only a running background"):
        c.responses.cancel(queued.id)
    # a long one, cancelled while it runs: its blocks freed, stored as cancelled
    long = c.responses.create(input="Once upon a time", background=True, model="m",
                              max_output_tokens=1500)  # fmt: skip
    cancelled = c.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    time.sleep(0.5)
    assert c.responses.retrieve(long.id).status == "cancelled"
    import httpx

    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["running"] == 0 and health["free_kv_blocks"] == health["total_kv_blocks"]
    for extra in ({"store": False}, {"stream": True}):
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(input="x", background=True, **ARGS, **extra)
        assert err.value.body["param"] == "background"
