"""`polymodal serve --enable-prompt-embeds`: `/v1/completions` takes vLLM's `prompt_embeds`
(base64 `torch.save` tensors) alone or after text prompts, streamed or not, with the same
completion as the tokens whose embeddings they are; `--enable-prompt-tokens-details` reports the
prefix cache's share of the prompt; every malformed embedding is a 400 naming it."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from tests.sdk.server_process import API_KEY, tiny_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.timeout(300)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TEXT = "the quick brown fox jumps over the lazy dog " * 4  # over two KV blocks of tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "qwen2")
    args = ("--enable-prompt-embeds", "--enable-prompt-tokens-details", "--dtype", "float32")
    with tiny_server(tmp_path_factory, *args, "--num-kv-blocks", "64", arch="qwen2") as url:
        yield url, path


def _b64(tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _complete(url, **body):
    body = {"model": "m", "max_tokens": 6, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", headers=HEADERS, json=body, timeout=60)


def _rows(url, path, text: str) -> torch.Tensor:
    """The model's own embeddings of `text`'s tokens (as the server tokenizes it)."""
    from safetensors.torch import load_file

    ids = httpx.post(f"{url}/tokenize", headers=HEADERS, json={"prompt": text}, timeout=60)
    weights = load_file(str(path / "model.safetensors"))
    table = next(w for name, w in weights.items() if name.endswith("embed_tokens.weight"))
    return table[torch.tensor(ids.json()["tokens"])]


def test_embeds_complete_as_their_tokens(served):
    url, path = served
    rows = _rows(url, path, TEXT)
    want = _complete(url, prompt=TEXT).json()
    got = _complete(url, prompt_embeds=_b64(rows), return_token_ids=True).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["choices"][0].get("prompt_token_ids") is None  # vLLM's: no ids for embeddings
    usage = got["usage"]
    assert usage["prompt_tokens"] == rows.shape[0] == want["usage"]["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0  # rows hash apart from tokens
    again = _complete(url, prompt_embeds=_b64(rows)).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32
    assert (
        _complete(url, prompt=TEXT).json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32
    )  # the text prompt's own blocks, cached by its first request

    # after the text prompts, a [1, n, hidden] tensor too; streamed: the same texts
    both = dict(prompt=["Hello", TEXT], prompt_embeds=[_b64(rows[None])])
    texts = [c["text"] for c in sorted(_complete(url, **both).json()["choices"],
                                       key=lambda c: c["index"])]  # fmt: skip
    assert texts[1] == texts[2] == want["choices"][0]["text"]
    with httpx.stream("POST", f"{url}/v1/completions", headers=HEADERS, timeout=60,
                      json={"model": "m", "max_tokens": 6, "temperature": 0, "stream": True,
                            "prompt_embeds": _b64(rows)}) as resp:  # fmt: skip
        chunks = [line[6:] for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks) == texts[2]


def test_bad_embeds_are_400s(served):
    url, _ = served
    cases = {
        "prompt_embeds is not valid base64": {"prompt_embeds": "not base64!"},
        "prompt_embeds[1] is not a tensor saved": {
            "prompt_embeds": [_b64(torch.zeros(2, 8)), base64.b64encode(b"junk").decode()]
        },
        "holds a dict, not a tensor": {"prompt_embeds": _b64({"a": torch.zeros(2)})},
        "hidden size": {"prompt_embeds": _b64(torch.zeros(3, 7))},
        "echo needs prompt tokens": {"prompt_embeds": _b64(torch.zeros(3, 8)), "echo": True},
        "give prompt or prompt_embeds": {},
    }
    for message, body in cases.items():
        resp = _complete(url, **body)
        assert resp.status_code == 400, (message, resp.text)
        assert message in resp.json()["error"]["message"]
    assert _complete(url, prompt="Hello").status_code == 200  # the engine serves on


def test_needs_the_option(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "32", arch="qwen2") as url:
        resp = _complete(url, prompt_embeds=_b64(torch.zeros(3, 8)))
        assert resp.status_code == 400
        assert "--enable-prompt-embeds" in resp.json()["error"]["message"]
        assert _complete(url, prompt="Hello").json()["usage"].get("prompt_tokens_details") is None
