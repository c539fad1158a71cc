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
import sys
import time
from pathlib import Path
from typing import Any

from polymodal.caption_io import (
    RecordWriter,
    compact_parquet,
    discover_inputs,
    media_kind,
    read_records,
)
from polymodal.cli import module_available
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
    from tqdm import tqdm

    from polymodal.feeder import run_prompts
    from polymodal.llm_core.sampling_params import SamplingParams

    params = params or SamplingParams(temperature=0.0, max_tokens=128)
    finished = {r["key"] for r in read_records(out)}
    todo = [p for p in paths if p not in finished]
    counts = {"done": 0, "errors": 0, "skipped": len(paths) - len(todo), "seconds": 0.0}
    start = time.monotonic()
    writer = RecordWriter(out)
    bar = tqdm(total=len(todo), unit="item", disable=not progress, file=sys.stderr, smoothing=0.1)
    items = ((key, build_prompt(key, prompt, media_options or {}), params) for key in todo)
    jobs = run_prompts(llm, items, workers=max(1, workers), max_in_flight=batch_size)
    try:
        for done in jobs:
            if done.error is not None:
                record = {"error": f"{type(done.error).__name__}: {done.error}"}
            else:
                first = done.output.outputs[0]
                record = {
                    "caption": first.text,
                    "finish_reason": first.finish_reason,
                    "prompt_tokens": done.output.usage.prompt_tokens,
                    "completion_tokens": done.output.usage.completion_tokens,
                }
            writer.write({"key": done.key, "kind": media_kind(done.key), **record})
            counts["errors" if done.error is not None else "done"] += 1
            counts["seconds"] = time.monotonic() - start
            bar.update(1)
    finally:
        jobs.close()  # aborts what is still in flight
        bar.close()
        writer.close()
    return counts


def plan_job(inputs: list[str], out: str) -> tuple[list[str], list[str]]:
    """(all inputs, those not yet in `out`), found without the model. Raises InvalidInputError
    for what would stop the job: a bad output name, Parquet without pyarrow, no inputs."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise InvalidInputError(f"--out must end in .jsonl or .parquet, got {out!r}")
    if suffix == ".parquet" and not module_available("pyarrow"):
        raise InvalidInputError(
            f"{out}: Parquet output needs pyarrow (the 'batch' extra): "
            "pip install 'polymodal[batch]', or write .jsonl"
        )
    paths = discover_inputs(inputs)
    if not paths:
        raise InvalidInputError(f"no image or video files matched {' '.join(map(repr, inputs))}")
    finished = {r["key"] for r in read_records(out)}
    return paths, [p for p in paths if p not in finished]


def caption_command(parser: argparse.ArgumentParser):
    """Add the `caption` arguments; returns `run(args) -> int`."""
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser.description = "Caption images and videos into a resumable JSONL or Parquet file."
    parser.add_argument("inputs", nargs="+", help="folders, glob patterns, list files or files")
    parser.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    parser.add_argument("--out", required=True, help="output file: .jsonl or .parquet")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="may use {kind} {name} {path}")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="always write --max-tokens (benchmarks)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="requests in flight at once (default: max_num_seqs)"
    )
    parser.add_argument(
        "--workers", type=int, default=PROCESS_WORKERS, help="threads loading media"
    )
    parser.add_argument("--max-pixels", type=int, help="resize budget per image / frame")
    parser.add_argument("--fps", type=float, help="video frames sampled per second")
    parser.add_argument("--num-frames", type=int, help="video frames sampled in all")
    parser.add_argument("--no-progress", action="store_true")
    add_engine_arguments(parser)

    def run(args) -> int:
        # Everything that can fail without the model is checked before it loads.
        paths, todo = plan_job(args.inputs, args.out)
        if not todo:
            if Path(args.out).suffix.lower() == ".parquet":
                compact_parquet(args.out)  # a journal a killed run left behind
            print(
                f"0 captioned, 0 errors, {len(paths)} already done -> {args.out} "
                "(nothing to do: the model was not loaded)",
                file=sys.stderr,
            )
            return 0

        from polymodal.llm import LLM
        from polymodal.llm_core.sampling_params import SamplingParams

        llm = LLM(args.model, **engine_kwargs(args))
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            max_tokens=args.max_tokens,
            ignore_eos=args.ignore_eos,
        )
        counts = caption_files(
            llm,
            paths,
            args.out,
            prompt=args.prompt,
            params=params,
            batch_size=args.batch_size,
            workers=args.workers,
            media_options={
                "max_pixels": args.max_pixels,
                "fps": args.fps,
                "num_frames": args.num_frames,
            },
            progress=not args.no_progress,
        )
        processed, seconds = counts["done"] + counts["errors"], counts["seconds"]
        print(
            f"{counts['done']} captioned, {counts['errors']} errors, {counts['skipped']} already "
            f"done -> {args.out} ({seconds:.1f}s from the first item to the last, "
            f"{processed / max(seconds, 1e-9):.2f} items/s)",
            file=sys.stderr,
        )
        return 0

    return run
