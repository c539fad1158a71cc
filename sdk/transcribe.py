"""`polymodal transcribe INPUTS --model MODEL --out FILE`: transcribe (or translate) many audio
files (wav, flac, ogg, mp3, m4a) into a resumable JSONL or Parquet file.

The same job as `polymodal caption` (`batch_job`): every finished file is durably appended to
the output, a rerun skips the files already there and ends before the model loads when none
is left, and a file that cannot be read is recorded with its error (and not retried).

Any model whose processor takes audio serves. A speech model (Whisper) transcribes each file
through `polymodal.speech` as `Pipeline(audio=path, ...)` does: files of any length (window
after window), the language detected when `--language` is not given (the record's `language`),
`--timestamps` for the record's `segments` (JSON text: a list of {start, end, text}), `--prompt`
as previous-context text. As OpenAI's whisper CLI: `--temperature-increment-on-fallback`
(temperatures from `--temperature` up to 1.0) with `--compression-ratio-threshold`,
`--logprob-threshold`, `--no-speech-threshold`; `--condition-on-prev-tokens`; and
`--word-timestamps` (each segment's `words`: {word, start, end}). A chat model
(Phi-4-multimodal) gets the audio and an instruction (`--prompt`, or one made from the task and
language). A model without audio input is refused from its config before any weight is loaded,
and `--language` / `--task` are checked against the model's processor then too (a typo would
otherwise be recorded as an error for every file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from polymodal.batch_job import (
    add_job_arguments,
    nothing_to_do,
    plan_job,
    report,
    run_job,
    sampling_params,
    usage_record,
)
from polymodal.caption import fill_template
from polymodal.caption_io import AUDIO_EXTENSIONS
from polymodal.feeder import PROCESS_WORKERS
from polymodal.llm_core.errors import InvalidInputError

TASKS = ("transcribe", "translate")
TRANSCRIPT_FIELDS = (
    "key", "text", "language", "task", "duration", "segments", "error", "finish_reason",
    "prompt_tokens", "completion_tokens",
)  # fmt: skip
# the instruction for chat models (a speech model's processor builds its own task prompt)
CHAT_INSTRUCTIONS = {
    "transcribe": "Transcribe the audio clip into text.",
    "translate": "Translate the audio clip into English.",
}


def takes_speech_options(processor: Any) -> bool:
    """Whether the processor builds the task prompt itself from `language` / `task` options
    (Whisper), rather than reading an instruction (a chat model)."""
    return "task" in getattr(processor, "MEDIA_OPTIONS", ())


def transcription_prompt(
    audio: Any,
    *,
    language: str | None = None,
    task: str | None = None,
    prompt: str | None = None,
    path: str = "",
) -> dict[str, Any]:
    """A chat model's prompt for one clip (a path, or anything `load_audio` takes): the audio
    and `prompt` (default: an instruction for `task`, naming `language`; it may use {name}
    and {path})."""
    content: list[dict[str, Any]] = [{"type": "audio", "audio": audio}]
    text = fill_template(prompt, "audio", path) if prompt else None
    if text is None:
        text = CHAT_INSTRUCTIONS[task or "transcribe"]
        if language:
            text += f" The speech is in {language}."
    content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}]}


def transcript_record(transcript: Any, timestamps: bool) -> dict[str, Any]:
    """A speech model's record: text, language, duration, segments (JSON text; with their
    words when timed by word) and usage."""
    segments = None
    if timestamps:
        pieces = []
        for s in transcript.segments:
            piece = {"start": s.start, "end": s.end, "text": s.text}
            if s.words is not None:
                piece["words"] = [w.to_dict() for w in s.words]
            pieces.append(piece)
        segments = json.dumps(pieces, ensure_ascii=False)
    return {
        "text": transcript.text, "language": transcript.language,
        "duration": transcript.duration, "segments": segments,
        "finish_reason": transcript.finish_reason, "prompt_tokens": transcript.prompt_tokens,
        "completion_tokens": transcript.completion_tokens,
    }  # fmt: skip


def audio_processor(model: str, revision=None, token=None, cache_dir=None) -> Any:
    """The processor of `model`, built from its config and tokenizer files (no weights are
    loaded); InvalidInputError naming the model when it takes no audio. None when the config
    names no architecture (`LLM` then says what is wrong)."""
    from polymodal.llm_core.loader import resolve_model_path
    from polymodal.llm_core.registry import processor_class

    path = resolve_model_path(model, revision, token, cache_dir)
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    if not architectures:
        return None
    cls = processor_class(architectures[0])  # UnsupportedModelError for an unknown one
    takes = tuple(getattr(cls, "MODALITIES", ())) if cls else ()
    if "audio" not in takes:
        raise InvalidInputError(
            f"model {model} ({architectures[0]}) takes no audio input (it takes "
            f"{' and '.join(takes) or 'text only'}): transcription needs a model with an audio "
            "encoder, such as Whisper or Phi-4-multimodal"
        )
    return cls.from_pretrained(path)


def fallback_temperatures(start: float, increment: float | None) -> tuple[float, ...] | None:
    """OpenAI whisper's `--temperature_increment_on_fallback`: `start`, `start + increment`,
    ... up to 1.0; None without an increment."""
    if increment is None:
        return None
    if increment <= 0:
        raise InvalidInputError(f"--temperature-increment-on-fallback={increment}: must be > 0")
    count = int(round((1.0 - start) / increment, 6)) + 1 if start <= 1.0 else 1
    return tuple(round(start + k * increment, 6) for k in range(max(1, count)))


def _flag(option: str) -> str:
    """The command-line flag of a speech option."""
    if option == "temperatures":
        return "--temperature-increment-on-fallback"
    return "--" + option.replace("_", "-")


def check_options(
    processor: Any, model: str, speech: dict[str, Any] | None = None, **options: Any
) -> None:
    """Check the job's options on a second of silence: a language, task, prompt or speech
    option (`speech`: fallback, conditioning, word times) the model does not take raises
    InvalidInputError here, before the job starts."""
    from polymodal.llm_core.sampling_params import SamplingParams
    from polymodal.llm_prompts import process_prompt
    from polymodal.processors.whisper_transcription import Transcription

    silence = (np.zeros(16_000, dtype=np.float32), 16_000)
    speech = {k: v for k, v in (speech or {}).items() if v not in (None, False)}
    if not takes_speech_options(processor):
        if speech:
            flags = ", ".join(_flag(k) for k in speech)
            raise InvalidInputError(f"{flags}: Whisper's options; {model} is a chat model")
        process_prompt(processor, transcription_prompt(silence, **options), model=model)
        return
    words = speech.pop("word_timestamps", False)
    if words and not processor.alignment_heads:
        raise InvalidInputError(
            f"--word-timestamps: {model}'s generation_config.json has no alignment_heads"
        )
    Transcription.load(
        processor, silence, SamplingParams(), language=options.get("language"),
        task=options.get("task"), previous_text=options.get("prompt"), **speech,
    )  # fmt: skip


def transcribe_files(
    llm: Any,
    paths: list[str],
    out: str | Path,
    *,
    language: str | None = None,
    task: str | None = None,
    prompt: str | None = None,
    timestamps: bool = False,
    speech: dict[str, Any] | None = None,
    params: Any = None,
    batch_size: int | None = None,
    workers: int = PROCESS_WORKERS,
    progress: bool = True,
) -> dict[str, int]:
    """Transcribe `paths` with `llm` (a `polymodal.LLM` whose model takes audio) into `out`,
    skipping finished keys; returns `batch_job.run_job`'s counts. `params` defaults to greedy
    decoding with the model's generation_config (Whisper's suppressed tokens); `timestamps`
    (speech models) writes each file's segments; `speech`: more `Transcription` options
    (`temperatures`, the thresholds, `condition_on_prev_tokens`, `word_timestamps`)."""
    from polymodal.llm_core.sampling_params import SamplingParams
    from polymodal.speech import run_transcriptions

    if task is not None and task not in TASKS:
        raise InvalidInputError(f"task={task!r}: choose from {list(TASKS)}")
    params = params or SamplingParams(temperature=0.0, max_tokens=448).with_defaults(
        llm.default_sampling
    )
    key_record = lambda key: {"language": language, "task": task or "transcribe"}  # noqa: E731
    common = dict(params=params, fields=TRANSCRIPT_FIELDS, batch_size=batch_size,
                  workers=workers, progress=progress, key_record=key_record)  # fmt: skip
    if not takes_speech_options(llm.processor):
        given = [k for k, v in (speech or {}).items() if v not in (None, False)]
        if given:
            raise InvalidInputError(f"{given}: Whisper's options; this is a chat model")
        return run_job(
            llm, paths, out, **common,
            make_prompt=lambda key: transcription_prompt(
                key, language=language, task=task, prompt=prompt, path=key
            ),
            make_record=lambda output: {"text": output.outputs[0].text, **usage_record(output)},
        )  # fmt: skip

    def make_prompt(key: str) -> dict[str, Any]:
        previous = fill_template(prompt, "audio", key) if prompt else None
        options = {"language": language, "task": task, "timestamps": timestamps,
                   "previous_text": previous, **(speech or {})}  # fmt: skip
        return {"audio": key, "options": options}

    def runner(llm: Any, items: Any, **kwargs: Any):
        jobs = ((key, p["audio"], sp, p["options"]) for key, p, sp in items)
        return run_transcriptions(llm, jobs, **kwargs)

    return run_job(
        llm, paths, out, **common, make_prompt=make_prompt, runner=runner,
        make_record=lambda transcript: transcript_record(
            transcript, timestamps or bool((speech or {}).get("word_timestamps"))
        ),
    )  # fmt: skip


def transcribe_command(parser: argparse.ArgumentParser):
    """Add the `transcribe` arguments; returns `run(args) -> int`."""
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser.description = "Transcribe audio files into a resumable JSONL or Parquet file."
    add_job_arguments(parser, max_tokens=448)
    parser.add_argument(
        "--language",
        help="the spoken language: a code (en) or name (english); default: detected (Whisper)",
    )
    parser.add_argument("--task", choices=TASKS, help="translate: into English; default transcribe")
    parser.add_argument(
        "--prompt",
        help="Whisper: previous-context text; chat models: the instruction (may use {name} {path})",
    )
    parser.add_argument(
        "--timestamps", action="store_true", help="Whisper: write each file's timed segments"
    )
    parser.add_argument(
        "--temperature-increment-on-fallback", type=float,
        help="Whisper: decode a window that fails a threshold again, this much hotter (to 1.0)",
    )  # fmt: skip
    for name, meaning in (
        ("compression-ratio-threshold", "a window whose token compression ratio is above"),
        ("logprob-threshold", "a window whose average logprob is below"),
        ("no-speech-threshold", "a window is silence (skipped) when P(no speech) is above"),
    ):
        parser.add_argument(f"--{name}", type=float, help=f"Whisper: {meaning} it falls back")
    parser.add_argument(
        "--condition-on-prev-tokens", action="store_true",
        help="Whisper: each window's prompt holds the previous windows' text",
    )  # fmt: skip
    parser.add_argument(
        "--word-timestamps", action="store_true",
        help="Whisper: each segment's words with their times (needs alignment_heads)",
    )  # fmt: skip
    add_engine_arguments(parser)

    def run(args) -> int:
        # Everything that can fail without the model's weights is checked before they load.
        paths, todo = plan_job(args.inputs, args.out, AUDIO_EXTENSIONS, "audio")
        if not todo:
            return nothing_to_do(args.out, TRANSCRIPT_FIELDS, len(paths), "transcribed")
        processor = audio_processor(args.model, args.revision, args.hf_token, args.download_dir)
        options = {"language": args.language, "task": args.task, "prompt": args.prompt}
        speech = {
            "temperatures": fallback_temperatures(
                args.temperature, args.temperature_increment_on_fallback
            ),
            "compression_ratio_threshold": args.compression_ratio_threshold,
            "logprob_threshold": args.logprob_threshold,
            "no_speech_threshold": args.no_speech_threshold,
            "condition_on_prev_tokens": args.condition_on_prev_tokens,
            "word_timestamps": args.word_timestamps,
        }
        if processor is not None:
            check_options(processor, args.model, speech, **options)

        from polymodal.llm import LLM

        llm = LLM(args.model, **engine_kwargs(args))
        counts = transcribe_files(
            llm,
            paths,
            args.out,
            **options,
            timestamps=args.timestamps,
            speech=speech,
            params=sampling_params(args, llm.default_sampling),
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
        )
        report(counts, args.out, "transcribed")
        return 0

    return run
