"""`polymodal transcribe INPUTS --model MODEL --out FILE`: transcribe (or translate) many audio
files (wav, flac, ogg, mp3, m4a) into a resumable JSONL or Parquet file.

The same job as `polymodal caption` (`batch_job`): every finished file is durably appended to
the output, a rerun skips the files already there and ends before the model loads when none
is left, and a file that cannot be read is recorded with its error (and not retried).

Any model whose processor takes audio serves: a speech model whose processor takes
`language` / `task` options (Whisper) gets each file as `Pipeline(audio=path, language=...,
task=...)` builds it, with `--prompt` as previous-context text; a chat model (Phi-4-multimodal)
gets the audio and an instruction (`--prompt`, or one made from the task and language). A model
without audio input is refused from its config before any weight is loaded, and `--language`
/ `--task` are checked against the model's processor then too (a typo would otherwise be
recorded as an error for every file).
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
    "key", "text", "language", "task", "error", "finish_reason", "prompt_tokens",
    "completion_tokens",
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
    speech_options: bool,
    *,
    language: str | None = None,
    task: str | None = None,
    prompt: str | None = None,
    path: str = "",
) -> dict[str, Any]:
    """The chat prompt for one clip (a path, or anything `load_audio` takes).

    `speech_options`: the processor takes `language` / `task` (Whisper): the prompt is what
    `Pipeline(audio=..., language=..., task=...)` sends, `prompt` (if any) its previous-context
    text. Otherwise `prompt` (default: an instruction for `task`, naming `language`) is the
    text after the audio. `prompt` may use {name} and {path}.
    """
    content: list[dict[str, Any]] = [{"type": "audio", "audio": audio}]
    text = fill_template(prompt, "audio", path) if prompt else None
    if speech_options:
        if text:
            content.append({"type": "text", "text": text})
        options = {"language": language, "task": task}
        options = {k: v for k, v in options.items() if v is not None}
        return {"messages": [{"role": "user", "content": content}], **options}
    if text is None:
        text = CHAT_INSTRUCTIONS[task or "transcribe"]
        if language:
            text += f" The speech is in {language}."
    content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}]}


def audio_processor(model: str) -> Any:
    """The processor of `model`, built from its config and tokenizer files (no weights are
    loaded); InvalidInputError naming the model when it takes no audio. None when the config
    names no architecture (`LLM` then says what is wrong)."""
    from polymodal.llm_core.loader import resolve_model_path
    from polymodal.llm_core.registry import processor_class

    path = resolve_model_path(model)
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


def check_options(processor: Any, model: str, **prompt_options: Any) -> None:
    """Process a second of silence with the job's options: a language, task or prompt the
    model does not take raises InvalidInputError here, before the job starts."""
    from polymodal.llm_prompts import process_prompt

    silence = (np.zeros(16_000, dtype=np.float32), 16_000)
    probe = transcription_prompt(silence, takes_speech_options(processor), **prompt_options)
    process_prompt(processor, probe, model=model)


def transcribe_files(
    llm: Any,
    paths: list[str],
    out: str | Path,
    *,
    language: str | None = None,
    task: str | None = None,
    prompt: str | None = None,
    params: Any = None,
    batch_size: int | None = None,
    workers: int = PROCESS_WORKERS,
    progress: bool = True,
) -> dict[str, int]:
    """Transcribe `paths` with `llm` (a `polymodal.LLM` whose model takes audio) into `out`,
    skipping finished keys; returns `batch_job.run_job`'s counts. `params` defaults to greedy
    decoding with the model's generation_config (Whisper's suppressed tokens)."""
    from polymodal.llm_core.sampling_params import SamplingParams

    if task is not None and task not in TASKS:
        raise InvalidInputError(f"task={task!r}: choose from {list(TASKS)}")
    speech = takes_speech_options(llm.processor)
    params = params or SamplingParams(temperature=0.0, max_tokens=448).with_defaults(
        llm.default_sampling
    )

    def make_prompt(key: str) -> dict[str, Any]:
        return transcription_prompt(
            key, speech, language=language, task=task, prompt=prompt, path=key
        )

    return run_job(
        llm, paths, out, make_prompt=make_prompt,
        make_record=lambda output: {"text": output.outputs[0].text, **usage_record(output)},
        key_record=lambda key: {"language": language, "task": task or "transcribe"},
        params=params, fields=TRANSCRIPT_FIELDS, batch_size=batch_size, workers=workers,
        progress=progress,
    )  # fmt: skip


def transcribe_command(parser: argparse.ArgumentParser):
    """Add the `transcribe` arguments; returns `run(args) -> int`."""
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser.description = "Transcribe audio files into a resumable JSONL or Parquet file."
    add_job_arguments(parser, max_tokens=448)
    parser.add_argument("--language", help="the spoken language: a code (en) or name (english)")
    parser.add_argument("--task", choices=TASKS, help="translate: into English; default transcribe")
    parser.add_argument(
        "--prompt",
        help="Whisper: previous-context text; chat models: the instruction (may use {name} {path})",
    )
    add_engine_arguments(parser)

    def run(args) -> int:
        # Everything that can fail without the model's weights is checked before they load.
        paths, todo = plan_job(args.inputs, args.out, AUDIO_EXTENSIONS, "audio")
        if not todo:
            return nothing_to_do(args.out, TRANSCRIPT_FIELDS, len(paths), "transcribed")
        processor = audio_processor(args.model)
        options = {"language": args.language, "task": args.task, "prompt": args.prompt}
        if processor is not None:
            check_options(processor, args.model, **options)

        from polymodal.llm import LLM

        llm = LLM(args.model, **engine_kwargs(args))
        counts = transcribe_files(
            llm,
            paths,
            args.out,
            **options,
            params=sampling_params(args, llm.default_sampling),
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
        )
        report(counts, args.out, "transcribed")
        return 0

    return run
