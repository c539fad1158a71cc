"""`polymodal run-batch`: an OpenAI batch file through the server's routes offline; results in
input order with OpenAI's output shape; the chat answer is `LLM.chat`'s; refused requests keep
their status and error body; lines that are not requests are errors of their own."""

from __future__ import annotations

import json

import pytest

from polymodal import LLM, SamplingParams
from tests.helpers import tiny_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytestmark = pytest.mark.timeout(300)


def test_a_batch_file_runs_in_order(tmp_path_factory, tmp_path):
    from PIL import Image

    from polymodal.cli import main

    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    (tmp_path / "media").mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "media" / "red.png")
    messages = [{"role": "user", "content": "Describe a cat."}]
    image = {"type": "image_url", "image_url": {"url": f"file://{tmp_path}/media/red.png"}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]
    chat = {"model": "m", "messages": messages, "max_tokens": 5, "temperature": 0}
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "Once upon", "max_tokens": 3}},
        {"custom_id": "other-model", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat, "model": "gpt-4o"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/models", "body": {}},
        {"custom_id": "streamed", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat, "stream": True}},
        {"custom_id": "image", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat, "messages": with_image}},
    ]  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\nnot json\n"
    text += "\n".join(json.dumps(line) for line in lines[2:]) + "\n"
    (tmp_path / "in.jsonl").write_text(text)
    files = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"]
    engine = ["--model", ckpt, "--served-model-name", "m", "--device", "cpu"]
    argv = ["run-batch", *files, *engine, "--num-kv-blocks", "64", "--allowed-media-dir",
            tmp_path / "media"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["chat", "completion", None, "other-model", "get",
                                             "streamed", "image"]  # fmt: skip
    first = out[0]["response"]
    assert first["status_code"] == 200 and first["request_id"] == first["body"]["id"]
    want = (
        LLM(ckpt, device="cpu", num_kv_blocks=64)
        .chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
        .outputs[0]
        .text
    )
    assert first["body"]["choices"][0]["message"]["content"] == want
    assert out[1]["response"]["body"]["object"] == "text_completion"
    assert out[2]["response"] is None and "not JSON" in out[2]["error"]["message"]
    assert out[3]["response"]["status_code"] == 404 and out[3]["error"] is None
    assert "gpt-4o" in out[3]["response"]["body"]["error"]["message"]
    assert out[4]["response"] is None and "POST" in out[4]["error"]["message"]
    assert out[5]["response"] is None and "stream" in out[5]["error"]["message"]
    usage = out[6]["response"]["body"]["usage"]  # the local image, under --allowed-media-dir
    assert usage["prompt_tokens"] > first["body"]["usage"]["prompt_tokens"]
