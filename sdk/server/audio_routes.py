"""OpenAI's speech-to-text routes: `POST /v1/audio/transcriptions` and `/v1/audio/translations`
(multipart form: `file`, `model`, `language`, `prompt`, `response_format`, `temperature`).

The clip is decoded and resampled by the model's processor (`processors/audio.py`), one window
a request (Whisper: 30 s); `prompt` is previous-context text. `response_format` json or text;
srt, vtt and verbose_json need segment timestamps, which are not generated yet (a 400 says
so). A model without an audio encoder answers a 400 naming it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from polymodal.llm_core.errors import PolymodalError
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.server.errors import RequestError
from polymodal.server.serving import client_error

RESPONSE_FORMATS = ("json", "text")
NEEDS_TIMESTAMPS = ("srt", "vtt", "verbose_json")


def add_audio_routes(
    router: APIRouter,
    engine,
    check_model: Callable[[str | None], str],
    takes_audio: Callable[[str], None],
    defaults: dict,
) -> None:
    """Register the transcription and translation routes on `router` (the `/v1` one)."""

    async def run(request: Request, task: str):
        form = await request.form()
        check_model(form.get("model") or None)
        takes_audio("file")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("a multipart 'file' field holding the audio is required", "file")
        fmt = form.get("response_format") or "json"
        if fmt in NEEDS_TIMESTAMPS:
            raise RequestError(
                f"response_format {fmt!r} needs segment timestamps, which are not supported "
                f"yet; use one of {list(RESPONSE_FORMATS)}",
                "response_format",
            )
        if fmt not in RESPONSE_FORMATS:
            raise RequestError(
                f"response_format must be one of {list(RESPONSE_FORMATS + NEEDS_TIMESTAMPS)}, "
                f"got {fmt!r}",
                "response_format",
            )
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise RequestError("temperature must be a number", "temperature") from None
        options = {"task": task}
        if form.get("language"):
            options["language"] = form["language"]
        prompt = {
            "prompt": form.get("prompt") or "",
            "multi_modal_data": {"audio": await upload.read()},
            "mm_processor_kwargs": options,
        }
        try:
            params = SamplingParams(temperature=temperature)
            params = params.with_defaults({"max_tokens": None, **defaults})
            out = await engine.generate(prompt, params)
        except PolymodalError as exc:
            return client_error(exc, "file")
        text = out.outputs[0].text
        return PlainTextResponse(text) if fmt == "text" else {"text": text}

    @router.post("/audio/transcriptions")
    async def transcriptions(request: Request):
        return await run(request, "transcribe")

    @router.post("/audio/translations")
    async def translations(request: Request):
        return await run(request, "translate")
