"""`polymodal caption INPUTS --model MODEL --out FILE`: caption many images and videos.

Resumable and crash-safe: every finished item is durably appended to the output (see
`caption_io`), a rerun skips the items already there, and items that cannot be read are
recorded with their error (and not retried). Media is loaded on a small thread pool ahead of
the engine, and up to `--batch-size` requests (default: the engine's `max_num_seqs`) run at
once, collected as they finish.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from polymodal.batch_job import (
    add_job_arguments,
    nothing_to_do,
    report,
    run_job,
    sampling_params,
    usage_record,
)
from polymodal.batch_job import plan_job as plan_batch
from polymodal.caption_io import RECORD_FIELDS, VISUAL_EXTENSIONS, media_kind
from polymodal.feeder import PROCESS_WORKERS
from polymodal.llm_core.errors import InvalidInputError

DEFAULT_PROMPT = "Describe this {kind} in detail."
_PLACEHOLDER = re.compile(r"\{(kind|name|path)\}")


def fill_template(template: str, kind: str, path: str) -> str:
    """The prompt text: `{kind}`, `{name}` and `{path}` filled in; every other brace is kept as
    written (a JSON example in the prompt stays as is)."""
    values = {"kind": kind, "name": Path(path).name if path else "", "path": path}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def build_prompt(path: str, template: str, media_options: dict[str, Any]) -> dict[str, Any]:
    """The chat prompt for one file; the template may use {kind}, {name} and {path}."""
    kind = media_kind(path)
    text = fill_template(template, kind, path)
    content = [{"type": kind, kind: path}, {"type": "text", "text": text}]
    options = {k: v for k, v in media_options.items() if v is not None}
    return {"messages": [{"role": "user", "content": content}], **options}


def caption_files(
    llm: Any,
    paths: list[str],
    out: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    params: Any = None,
    batch_size: int | None = None,
    workers: int = PROCESS_WORKERS,
    media_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Caption `paths` with `llm` (a `polymodal.LLM`) into `out`, skipping finished keys.

    `batch_size` requests run at once (default: the engine's `max_num_seqs`, so its batch is
    full); up to `PREFETCH` more are processed ahead on `workers` threads. Returns counts:
    `done` (captioned now), `errors` (recorded with an error now), `skipped`, and `seconds`
    from the first item's processing to the last item's record.
    """
    from polymodal.llm_core.sampling_params import SamplingParams

    def make_record(output: Any) -> dict[str, Any]:
        return {"caption": output.outputs[0].text, **usage_record(output)}

    counts = run_job(
        llm, paths, out,
        make_prompt=lambda key: build_prompt(key, prompt, media_options or {}),
        make_record=make_record, key_record=lambda key: {"kind": media_kind(key)},
        params=params or SamplingParams(temperature=0.0, max_tokens=128),
        fields=RECORD_FIELDS, batch_size=batch_size, workers=workers, progress=progress,
    )  # fmt: skip
    return counts


def plan_job(inputs: list[str], out: str) -> tuple[list[str], list[str]]:
    """(all inputs, those not yet in `out`), found without the model (`batch_job.plan_job`
    over image and video files)."""
    return plan_batch(inputs, out, VISUAL_EXTENSIONS, "image or video")


def caption_command(parser: argparse.ArgumentParser):
    """Add the `caption` arguments; returns `run(args) -> int`."""
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser.description = "Caption images and videos into a resumable JSONL or Parquet file."
    add_job_arguments(parser, max_tokens=128)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="may use {kind} {name} {path}")
    parser.add_argument("--max-pixels", type=int, help="resize budget per image / frame")
    parser.add_argument("--fps", type=float, help="video frames sampled per second")
    parser.add_argument("--num-frames", type=int, help="video frames sampled in all")
    parser.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="N caption processes, each its own engine on its own GPUs (the items split "
        "among them; caption_parallel.py)",
    )
    add_engine_arguments(parser)

    def run(args) -> int:
        from polymodal.caption_parallel import caption_parallel, merge_shards

        if args.data_parallel_size < 1:
            raise InvalidInputError("--data-parallel-size must be at least 1")
        merge_shards(args.out)  # what a killed parallel run finished counts as done
        # Everything that can fail without the model is checked before it loads.
        paths, todo = plan_job(args.inputs, args.out)
        if not todo:
            return nothing_to_do(args.out, RECORD_FIELDS, len(paths), "captioned")
        options = {
            "prompt": args.prompt,
            "params": sampling_params(args),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "media_options": {
                "max_pixels": args.max_pixels,
                "fps": args.fps,
                "num_frames": args.num_frames,
            },
        }
        if args.data_parallel_size > 1:
            counts = caption_parallel(args, todo, len(paths) - len(todo), options)
        else:
            from polymodal.llm import LLM

            llm = LLM(args.model, **engine_kwargs(args))
            counts = caption_files(llm, paths, args.out, progress=not args.no_progress,
                                   **options)  # fmt: skip
        report(counts, args.out, "captioned")
        return 0

    return run
