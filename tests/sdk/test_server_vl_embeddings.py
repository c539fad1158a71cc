"""A multimodal embedding model served (`polymodal serve QWEN2-VL --runner pooling`): chat-form
`/v1/embeddings` with an image gives `LLM.embed`'s vector for the same messages; the server's
media policy holds for these messages as for chat (a local file is refused)."""

from __future__ import annotations

import pytest

from tests.sdk.server_process import png_data_url, post, tiny_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--runner", "pooling", "--num-kv-blocks", "64") as url:
        yield url


def test_chat_form_embeddings_with_an_image(server, tmp_path_factory):
    import torch

    from polymodal import LLM
    from tests.helpers import tiny_checkpoint

    url = png_data_url(40, 30, (10, 200, 90))
    parts = [{"type": "image_url", "image_url": {"url": url}},
             {"type": "text", "text": "A picture."}]  # fmt: skip
    messages = [{"role": "user", "content": parts}]
    got = post(server, "/v1/embeddings", {"messages": messages})
    assert got.status_code == 200, got.text
    vector = torch.tensor(got.json()["data"][0]["embedding"])
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_vl")), runner="pooling",
              device="cpu", num_kv_blocks=64)  # fmt: skip
    (want,) = llm.embed([messages])
    assert (vector - torch.tensor(want.outputs.embedding)).abs().max() < 1e-4
    text_only = post(server, "/v1/embeddings", {"input": "A picture."}).json()
    assert text_only["usage"]["prompt_tokens"] < got.json()["usage"]["prompt_tokens"]
    # the messages' media options: a smaller image, fewer image tokens
    big = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(224, 168)}}]}]  # fmt: skip
    full = post(server, "/v1/embeddings", {"messages": big}).json()["usage"]["prompt_tokens"]
    options = {"max_pixels": 56 * 56}
    small = post(server, "/v1/embeddings", {"messages": big, "mm_processor_kwargs": options})
    assert small.status_code == 200, small.text
    assert small.json()["usage"]["prompt_tokens"] < full
    misplaced = post(server, "/v1/embeddings", {"input": "x", "mm_processor_kwargs": {}})
    assert misplaced.json()["error"]["param"] == "mm_processor_kwargs"
    local = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]  # fmt: skip
    refused = post(server, "/v1/embeddings", {"messages": local})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"].startswith("messages[0].content[0]")
