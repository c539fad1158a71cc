"""What the resumable batch jobs share (`polymodal caption`, `polymodal transcribe`): planning
without the model, the run loop over `feeder.run_prompts` that appends one durable record per
finished item, the common command-line options and the summary line.

A job is a list of keys (absolute paths), a prompt per key and a record per finished item; the
output (`caption_io`) is the resume state: a rerun skips every key already in it, and a rerun
with nothing left ends before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polymodal.caption_io import RecordWriter, compact_parquet, discover_inputs, read_records
from polymodal.cli import module_available
from polymodal.feeder import PROCESS_WORKERS
from polymodal.llm_core.errors import InvalidInputError


def plan_job(
    inputs: list[str], out: str, extensions: set[str], what: str
) -> tuple[list[str], list[str]]:
    """(all inputs, those not yet in `out`), found without the model; folders contribute their
    files with `extensions` (`what` names them in the error). Raises InvalidInputError for
    what would stop the job: a bad output name, Parquet without pyarrow, no inputs."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise InvalidInputError(f"--out must end in .jsonl or .parquet, got {out!r}")
    if suffix == ".parquet" and not module_available("pyarrow"):
        raise InvalidInputError(
            f"{out}: Parquet output needs pyarrow (the 'batch' extra): "
            "pip install 'polymodal[batch]', or write .jsonl"
        )
    paths = discover_inputs(inputs, extensions)
    if not paths:
        raise InvalidInputError(f"no {what} files matched {' '.join(map(repr, inputs))}")
    finished = {r["key"] for r in read_records(out)}
    return paths, [p for p in paths if p not in finished]


def run_job(
    llm: Any,
    paths: list[str],
    out: str | Path,
    *,
    make_prompt: Callable[[str], Any],
    make_record: Callable[[Any], dict[str, Any]],
    key_record: Callable[[str], dict[str, Any]] | None = None,
    params: Any,
    fields: tuple[str, ...],
    batch_size: int | None = None,
    workers: int = PROCESS_WORKERS,
    progress: bool = True,
    runner: Callable[..., Any] | None = None,
) -> dict[str, int]:
    """Run `make_prompt(key)` for every key of `paths` not yet in `out` through `llm`; append
    `make_record(output)` (or `error` for an item that failed), with `key` and the fields of
    `key_record(key)`, as each finishes. `runner` (default `feeder.run_prompts`) drives the
    engine over the `(key, prompt, params)` items (`speech.run_transcriptions`' adapter for
    Whisper transcripts).

    `batch_size` requests run at once (default: the engine's `max_num_seqs`); up to
    `feeder.PREFETCH` more are processed ahead on `workers` threads. Returns counts: `done`,
    `errors` (recorded with an error now), `skipped` (already in `out`), and `seconds` from the
    first item's processing to the last item's record.
    """
    from tqdm import tqdm

    from polymodal.feeder import run_prompts

    finished = {r["key"] for r in read_records(out)}
    todo = [p for p in paths if p not in finished]
    counts = {"done": 0, "errors": 0, "skipped": len(paths) - len(todo), "seconds": 0.0}
    start = time.monotonic()
    writer = RecordWriter(out, fields)
    bar = tqdm(total=len(todo), unit="item", disable=not progress, file=sys.stderr, smoothing=0.1)
    jobs = (runner or run_prompts)(
        llm, ((key, make_prompt(key), params) for key in todo), workers=max(1, workers),
        max_in_flight=batch_size,
    )  # fmt: skip
    try:
        for done in jobs:
            if done.error is not None:
                record = {"error": f"{type(done.error).__name__}: {done.error}"}
            else:
                record = make_record(done.output)
            extra = key_record(done.key) if key_record else {}
            writer.write({"key": done.key, **extra, **record})
            counts["errors" if done.error is not None else "done"] += 1
            counts["seconds"] = time.monotonic() - start
            bar.update(1)
    finally:
        jobs.close()  # aborts what is still in flight
        bar.close()
        writer.close()
    return counts


def usage_record(output: Any) -> dict[str, Any]:
    """The first completion's `finish_reason` and the token counts of a `RequestOutput`."""
    return {
        "finish_reason": output.outputs[0].finish_reason,
        "prompt_tokens": output.usage.prompt_tokens,
        "completion_tokens": output.usage.completion_tokens,
    }


def add_job_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The options every batch job takes: inputs, model, output, sampling, batching."""
    parser.add_argument("inputs", nargs="+", help="folders, glob patterns, list files or files")
    parser.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    parser.add_argument("--out", required=True, help="output file: .jsonl or .parquet")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
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
    parser.add_argument("--no-progress", action="store_true")


def sampling_params(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """The `SamplingParams` of the job's options; `defaults` (the model's generation_config)
    fill what the options do not set."""
    from polymodal.llm_core.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    return params.with_defaults(defaults) if defaults else params


def nothing_to_do(out: str, fields: tuple[str, ...], total: int, verb: str) -> int:
    """End a job whose every input is already in `out` (compacting a journal a killed Parquet
    run left behind); returns the exit status."""
    if Path(out).suffix.lower() == ".parquet":
        compact_parquet(out, fields)
    print(
        f"0 {verb}, 0 errors, {total} already done -> {out} "
        "(nothing to do: the model was not loaded)",
        file=sys.stderr,
    )
    return 0


def report(counts: dict[str, Any], out: str, verb: str) -> None:
    """The summary line on stderr."""
    processed, seconds = counts["done"] + counts["errors"], counts["seconds"]
    print(
        f"{counts['done']} {verb}, {counts['errors']} errors, {counts['skipped']} already "
        f"done -> {out} ({seconds:.1f}s from the first item to the last, "
        f"{processed / max(seconds, 1e-9):.2f} items/s)",
        file=sys.stderr,
    )
