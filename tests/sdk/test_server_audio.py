"""Audio in the surfaces, before any audio model exists: `input_audio` / `audio_url` chat parts
are parsed and checked, and a model without an audio encoder answers a 400 naming the model
(server), or raises naming it (`LLM`, `Pipeline`). In process: FastAPI's test client over a
real AsyncEngine with a tiny text model."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from polymodal import InvalidInputError
from polymodal.async_engine import AsyncEngine
from polymodal.processors.chat import split_messages
from tests.helpers import tiny_checkpoint
from tests.processors.audio_signals import encode, tone

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from polymodal.server.app import create_app  # noqa: E402

WAV = encode(tone(440.0, 0.5, 16000), 16000, "wav")
B64 = base64.b64encode(WAV).decode()


def _chat(part):
    content = [part, {"type": "text", "text": "Hi"}]
    return {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def _input_audio(data, fmt):
    return _chat({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = AsyncEngine(
        str(tiny_checkpoint(tmp_path_factory, "qwen2")), separate_process=False, num_kv_blocks=64
    )
    yield eng
    eng.close()


def test_audio_parts_to_a_model_without_audio_are_a_400_naming_it(engine):
    parts = [
        {"type": "input_audio", "input_audio": {"data": B64, "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + B64}},
    ]
    with TestClient(create_app(engine, "m")) as client:
        for part in parts:
            resp = client.post("/v1/chat/completions", json=_chat(part))
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert "model 'm' (Qwen2ForCausalLM) takes no audio input" in error["message"]
            assert "no audio encoder" in error["message"]
            assert error["param"] == "messages[0].content[0]"
            assert error["code"] == "unsupported_modality"
        # a malformed part is refused by the schema, naming the message's content
        bad = {"type": "input_audio", "input_audio": {"data": B64}}
        resp = client.post("/v1/chat/completions", json=_chat(bad))
        assert resp.status_code == 400 and "messages[0].content" in resp.json()["error"]["param"]
        assert client.post("/v1/chat/completions", json=_chat({"type": "text", "text": "x"}))


def test_input_audio_checked_for_a_model_that_takes_audio(engine, monkeypatch):
    # a model whose processor takes audio (none is built yet): the route checks the part
    monkeypatch.setitem(engine.model_info, "modalities", ["audio"])
    with TestClient(create_app(engine, "m")) as client:

        def message(body):
            resp = client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 400, resp.text
            return resp.json()["error"]["message"]

        assert "not valid base64" in message(_input_audio("%%%", "wav"))
        assert "format must be one of" in message(_input_audio(B64, "aiff"))
        local = _chat({"type": "audio_url", "audio_url": {"url": "/etc/passwd"}})
        assert "--allowed-media-dir" in message(local)
        # a well-formed part reaches the processor, which (text-only here) refuses it too
        assert "takes no audio input" in message(_input_audio(B64, "wav"))


def test_chat_parts_parse_to_audio_refs():
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": B64, "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "a.flac"}},
        {"type": "audio", "audio": "b.mp3"},
        {"type": "text", "text": "Transcribe."},
    ]}]  # fmt: skip
    template, refs = split_messages(messages)
    assert [r.modality for r in refs] == ["audio"] * 3
    assert refs[0].source == WAV and refs[1].source == "a.flac" and refs[2].source == "b.mp3"
    assert [p["type"] for p in template[0]["content"]] == ["audio", "audio", "audio", "text"]
    with pytest.raises(InvalidInputError, match=r"part 1: input_audio.data is not valid base64"):
        split_messages([{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "??", "format": "wav"}}]}])  # fmt: skip


def test_llm_and_pipeline_refuse_audio_naming_the_model(tmp_path_factory):
    from polymodal import LLM, Pipeline

    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    llm = LLM(ckpt, device="cpu", num_kv_blocks=32)
    clip = (tone(440.0, 0.5, 16000), 16000)
    named = r"model '.*qwen2.*' \(Qwen2ForCausalLM\) takes no audio input: it has no audio enc"
    with pytest.raises(InvalidInputError, match=named):
        llm.generate({"prompt": "Hi", "multi_modal_data": {"audio": clip}}, use_tqdm=False)
    with pytest.raises(InvalidInputError, match=named):
        llm.chat([{"role": "user", "content": [{"type": "audio", "audio": WAV}]}], use_tqdm=False)
    pipe = Pipeline(ckpt, device="cpu", num_kv_blocks=32)
    with pytest.raises(InvalidInputError, match=named):
        pipe(audio=clip, text="Transcribe.", max_tokens=2)
    results = pipe([{"audio": WAV, "text": "a"}, {"text": "b"}], max_tokens=2)
    assert "takes no audio input" in results[0].error and results[1].error is None
    with pytest.raises(InvalidInputError, match="limit_mm_per_prompt"):
        LLM(ckpt, device="cpu", num_kv_blocks=32, limit_mm_per_prompt={"speech": 1})
    assert np.isfinite(clip[0]).all()
