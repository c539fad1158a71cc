"""Streamed transcription (vLLM's `stream=true` form field on `/v1/audio/transcriptions`): the
text of each accepted window comes as a `transcription.chunk` delta, the deltas join to the
unstreamed route's text, a last chunk carries the finish reason, `stream_include_usage` adds
the usage, `[DONE]` ends it; formats that cannot stream and bad audio are 400s before any
chunk."""

import io
import json

import pytest

from tests.sdk.test_speech import RATE, clip

pytest.importorskip("fastapi")


def test_streamed_transcription(tmp_path_factory):
    import soundfile
    from fastapi.testclient import TestClient

    from polymodal.async_engine import AsyncEngine
    from polymodal.server.app import create_app
    from tests.helpers import tiny_checkpoint

    buffer = io.BytesIO()
    soundfile.write(buffer, clip("sweep", 12.0), RATE, format="WAV", subtype="FLOAT")
    files = {"file": ("a.wav", buffer.getvalue(), "audio/wav")}
    form = {"model": "whisper", "language": "fr", "temperature": "0"}
    path = str(tiny_checkpoint(tmp_path_factory, "whisper"))
    engine = AsyncEngine(path, separate_process=False, num_kv_blocks=128, dtype="float32")
    try:
        with TestClient(create_app(engine, "whisper")) as client:
            whole = client.post("/v1/audio/transcriptions", data=form, files=files).json()
            streamed = client.post("/v1/audio/transcriptions", files=files, data={
                **form, "stream": "true", "stream_include_usage": "true"})  # fmt: skip
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            lines = [x[6:] for x in streamed.text.splitlines() if x.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            chunks = [json.loads(x) for x in lines[:-1]]
            assert all(c["object"] == "transcription.chunk" for c in chunks)
            *texts, usage = chunks
            deltas = [c["choices"][0]["delta"]["content"] for c in texts]
            assert "".join(deltas) == whole["text"]
            assert sum(1 for d in deltas if d) >= 2  # three 5 s windows: text as each is kept
            assert texts[-1]["choices"][0]["finish_reason"] is not None
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
            refused = client.post("/v1/audio/transcriptions", files=files, data={
                **form, "stream": "true", "response_format": "verbose_json"})  # fmt: skip
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
            junk = {"file": ("a.wav", b"not audio", "audio/wav")}
            bad = client.post("/v1/audio/transcriptions", files=junk,
                              data={**form, "stream": "true"})  # fmt: skip
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    finally:
        engine.close()
