"""OpenAI's speech-to-text routes: `POST /v1/audio/transcriptions` and `/v1/audio/translations`
(multipart form: `file`, `model`, `language`, `prompt`, `response_format`, `temperature`,
`timestamp_granularities[]`, and the extra fields below).

Each clip runs through `polymodal.speech.transcribe_async` (`Transcription`): the language is
detected when not given, a clip longer than one window (Whisper: 30 s) is decoded window after
window, `prompt` is previous-context text. `response_format`: `json` ({"text"}), `text`,
`verbose_json` (task, language, duration, text, segments with OpenAI's fields; `avg_logprob` is
the mean logprob after the logit rules (suppressed tokens, timestamp rules), `no_speech_prob`
P(`<|nospeech|>`) after `<|startoftranscript|>`), `srt` and `vtt`. `timestamp_granularities[]`:
`segment`, `word` (verbose_json only; `words`: [{word, start, end}], from the alignment heads'
cross-attention, computed where the engine runs; a model without `alignment_heads` answers a
400). `temperature`: one value, as OpenAI takes it; extra form fields (transformers' names):
`compression_ratio_threshold`, `logprob_threshold`, `no_speech_threshold` turn on the
temperature fallback (0.2 hotter per retry, up to 1.0) and `condition_on_prev_tokens=true` the
previous-window context. `stream=true` (json / text) streams each accepted window's text
(`transcription_chunks`, vLLM's chunk format). A model whose processor builds no speech prompts
answers a 400 naming it; a bad field, a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from polymodal.llm_core.errors import PolymodalError
from polymodal.llm_core.registry import processor_class
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.whisper_transcription import check_fallback
from polymodal.server.errors import RequestError
from polymodal.server.serving import client_error
from polymodal.speech import load_async, run_windows, takes_transcription, transcribe_async

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TIMED_FORMATS = ("verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")
# vLLM-style extra form fields: transformers' names for Whisper's fallback thresholds
THRESHOLDS = ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold")


def add_audio_routes(
    router: APIRouter,
    engine,
    check_model: Callable[[str | None], str],
    takes_audio: Callable[[str], None],
    defaults: dict,
) -> None:
    """Register the transcription and translation routes on `router` (the `/v1` one)."""
    processor = None
    if "audio" in engine.model_info.get("modalities", ()):
        cls = processor_class(engine.model_info["architecture"])
        processor = cls.from_pretrained(engine.model_info["model_dir"]) if cls else None

    async def run(request: Request, task: str):
        form = await request.form()
        check_model(form.get("model") or None)
        takes_audio("file")
        if not takes_transcription(processor):
            raise RequestError(
                f"model ({engine.model_info['architecture']}) takes audio in chat messages, "
                "not through the transcription routes (a speech model such as Whisper does)",
                "model", "model_not_supported",
            )  # fmt: skip
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("a multipart 'file' field holding the audio is required", "file")
        fmt = form.get("response_format") or "json"
        if fmt not in RESPONSE_FORMATS:
            raise RequestError(
                f"response_format must be one of {list(RESPONSE_FORMATS)}, got {fmt!r}",
                "response_format",
            )
        granularities = form.getlist("timestamp_granularities[]") or form.getlist(
            "timestamp_granularities"
        )
        unknown = [g for g in granularities if g not in GRANULARITIES]
        if unknown:
            raise RequestError(
                f"timestamp_granularities {unknown} are not supported; use {list(GRANULARITIES)}",
                "timestamp_granularities[]",
            )
        if "word" in granularities and fmt != "verbose_json":
            raise RequestError(
                "word timestamps need response_format=verbose_json, got "
                f"{fmt!r}", "timestamp_granularities[]",
            )  # fmt: skip
        temperature = _number(form, "temperature") or 0.0
        thresholds = {name: _number(form, name) for name in THRESHOLDS}
        condition = _flag(form, "condition_on_prev_tokens")
        options = {
            "language": form.get("language") or None,
            "task": task,
            "timestamps": fmt in TIMED_FORMATS or bool(granularities),
            "previous_text": form.get("prompt") or None,
            "details": fmt == "verbose_json",
            "temperatures": fallback_ladder(temperature, thresholds),
            "condition_on_prev_tokens": condition,
            "word_timestamps": "word" in granularities,
            **thresholds,
        }
        try:
            check_fallback(options["temperatures"] or (temperature,), *thresholds.values())
        except PolymodalError as exc:
            field = "temperature" if "temperature=" in str(exc) else "no_speech_threshold"
            raise RequestError(str(exc), field) from None
        if options["word_timestamps"] and not processor.alignment_heads:
            raise RequestError(
                "word timestamps: this model's generation_config.json has no alignment_heads",
                "timestamp_granularities[]",
            )
        if options["language"] is not None:
            try:
                processor.language_id(options["language"])
            except PolymodalError as exc:
                raise RequestError(str(exc), "language") from None
        stream = _flag(form, "stream")
        if stream and (fmt not in ("json", "text") or options["word_timestamps"]):
            raise RequestError("stream takes response_format json or text", "stream")
        try:
            params = SamplingParams(temperature=temperature).with_defaults(defaults)
            audio = await upload.read()
            if stream:  # the clip is decoded (or refused) before the stream starts
                loaded = await load_async(engine, processor, audio, params, **options)
                usage = _flag(form, "stream_include_usage")
                served = form.get("model") or engine.model_info["model_dir"]
                chunks = transcription_chunks(engine, loaded, served, usage)
                return StreamingResponse(chunks, media_type="text/event-stream")
            transcript = await transcribe_async(engine, processor, audio, params, **options)
        except PolymodalError as exc:
            return client_error(exc, "file")
        if fmt == "text":
            return PlainTextResponse(transcript.text)
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(subtitles(transcript.segments, fmt))
        if fmt == "verbose_json":
            return verbose_json(transcript, task, granularities)
        return {"text": transcript.text}

    @router.post("/audio/transcriptions")
    async def transcriptions(request: Request):
        return await run(request, "transcribe")

    @router.post("/audio/translations")
    async def translations(request: Request):
        return await run(request, "translate")


def verbose_json(transcript: Any, task: str, granularities: list[str] = ()) -> dict[str, Any]:
    """OpenAI's verbose transcription object (the language as a name: `german`): `segments`
    unless only `word` granularity is asked for, `words` when it is."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    language = transcript.language
    body = {
        "task": task,
        "language": LANGUAGES.get(language, language),
        "duration": transcript.duration,
        "text": transcript.text,
    }
    if "word" in granularities:
        body["words"] = [w.to_dict() for s in transcript.segments for w in s.words or ()]
    if not granularities or "segment" in granularities:
        body["segments"] = [segment.to_dict() for segment in transcript.segments]
    return body


def fallback_ladder(temperature: float, thresholds: dict[str, float | None]) -> tuple | None:
    """OpenAI's API: with a fallback threshold given, a window that fails is decoded again
    0.2 hotter, up to 1.0 (OpenAI whisper's `temperature_increment_on_fallback`); without one,
    the one `temperature`."""
    if all(v is None for v in thresholds.values()):
        return None
    steps = max(0, int(round((1.0 - temperature) / 0.2, 6)))
    return tuple(round(temperature + 0.2 * k, 6) for k in range(steps + 1))


async def transcription_chunks(engine, transcription, model: str, include_usage: bool):
    """vLLM's streamed transcription: `transcription.chunk` events with the text of each
    accepted window as `choices[0].delta.content`, a last one with the finish reason, the usage
    when asked (`stream_include_usage`), then `[DONE]`."""
    base = {"id": f"trsc-{uuid.uuid4().hex}", "object": "transcription.chunk",
            "created": int(time.time()), "model": model}  # fmt: skip

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    sent = ""
    try:
        async for text in run_windows(engine, transcription):
            if text.startswith(sent) and len(text) > len(sent):
                delta, sent = text[len(sent) :], text
                yield event([{"delta": {"content": delta}, "finish_reason": None}])
        final = transcription.result()
        rest = final.text[len(sent) :] if final.text.startswith(sent) else ""
        reason = final.finish_reason or "stop"
        yield event([{"delta": {"content": rest}, "finish_reason": reason}])
        if include_usage:
            prompt, completion = final.prompt_tokens, final.completion_tokens
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}  # fmt: skip
            yield event([], usage=usage)
    except PolymodalError as exc:  # after the first chunk: the error ends the stream
        error = {"message": str(exc), "type": type(exc).__name__}
        yield f"data: {json.dumps({'error': error})}\n\n"
    yield "data: [DONE]\n\n"


def _number(form: Any, name: str) -> float | None:
    value = form.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise RequestError(f"{name} must be a number, got {value!r}", name) from None


def _flag(form: Any, name: str) -> bool:
    value = (form.get(name) or "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return value in ("true", "1")


def subtitles(segments: list, fmt: str) -> str:
    """SubRip (`srt`) or WebVTT (`vtt`) cues, one per segment with text."""
    mark = "," if fmt == "srt" else "."
    cues = []
    for segment in (s for s in segments if s.text.strip()):
        span = f"{_clock(segment.start, mark)} --> {_clock(segment.end, mark)}"
        number = f"{len(cues) + 1}\n" if fmt == "srt" else ""
        cues.append(f"{number}{span}\n{segment.text.strip()}\n")
    body = "\n".join(cues)
    return body if fmt == "srt" else f"WEBVTT\n\n{body}"


def _clock(seconds: float, mark: str) -> str:
    """`HH:MM:SS,mmm` (srt) or `HH:MM:SS.mmm` (vtt)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{mark}{millis:03d}"
