"""`polymodal caption ... --data-parallel-size N`: N caption processes, each with its own engine on
its own GPUs (`CUDA_VISIBLE_DEVICES` per rank, as the server's replicas: `data_parallel.
rank_environments`), rank r given every N-th item left to do. Each writes its records to a JSONL
shard beside the output (`<out>.rank<r>.jsonl`); this process copies their finished lines into
the output as they come (the progress bar counts them), then removes the shards. A run killed
midway leaves shards behind: the next run (parallel or not) merges them first
(`merge_shards`), so nothing finished is done again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

from polymodal.caption_io import RECORD_FIELDS, RecordWriter, read_jsonl, read_records


def shard_files(out: str | Path) -> list[Path]:
    """The shards a parallel run of `out` writes (or left behind)."""
    out = Path(out)
    return sorted(out.parent.glob(out.name + ".rank*.jsonl"))


def merge_shards(out: str | Path, fields: tuple[str, ...] = RECORD_FIELDS) -> int:
    """Copy the records of `out`'s shards that `out` lacks into it, then remove the shards;
    returns how many were copied."""
    files = shard_files(out)
    if not files:
        return 0
    done, copied = {r["key"] for r in read_records(out)}, 0
    writer = RecordWriter(out, fields)
    try:
        for path in files:
            for record in read_jsonl(path):
                if record["key"] not in done:
                    writer.write(record)
                    done.add(record["key"])
                    copied += 1
    finally:
        writer.close()
    for path in files:
        path.unlink()
    return copied


def caption_parallel(args: Any, todo: list[str], skipped: int, options: dict) -> dict[str, Any]:
    """Caption `todo` over `args.data_parallel_size` processes into `args.out` (see the module
    docstring); returns the job's counts. `options`: `caption_files`' keywords. A rank that
    fails is an error naming it, after what the others finished is kept."""
    from tqdm import tqdm

    from polymodal.data_parallel import rank_environments
    from polymodal.engine_args import engine_kwargs

    size = args.data_parallel_size
    envs = rank_environments(size, engine_kwargs(args))
    spawn = multiprocessing.get_context("spawn")
    shards = [Path(f"{args.out}.rank{r}.jsonl") for r in range(size)]
    ranks = [
        spawn.Process(
            target=_rank_main,
            args=(args, todo[r::size], str(shard), envs[r], options),
            name=f"polymodal-caption-{r}",
        )  # fmt: skip
        for r, shard in enumerate(shards)
    ]
    for rank in ranks:
        rank.start()
    counts = {"done": 0, "errors": 0, "skipped": skipped, "seconds": 0.0}
    start, offsets = time.monotonic(), [0] * size
    writer = RecordWriter(args.out, RECORD_FIELDS)
    bar = tqdm(total=len(todo), unit="item", disable=args.no_progress, file=sys.stderr)
    try:
        while True:
            running = any(rank.is_alive() for rank in ranks)
            for r, shard in enumerate(shards):
                records, offsets[r] = _new_lines(shard, offsets[r])
                for record in records:
                    writer.write(record)
                    counts["errors" if record.get("error") is not None else "done"] += 1
                    counts["seconds"] = time.monotonic() - start
                bar.update(len(records))
            if not running:
                break
            time.sleep(0.5)
    finally:
        for rank in ranks:
            rank.join(timeout=0 if rank.is_alive() else None)
        bar.close()
        writer.close()
    failed = [r for r, rank in enumerate(ranks) if rank.exitcode != 0]
    merge_shards(args.out)  # (lines a rank wrote after the last look) and the shards go
    if failed:
        codes = ", ".join(f"rank {r} exited with {ranks[r].exitcode}" for r in failed)
        raise RuntimeError(f"caption --data-parallel-size {size}: {codes}; rerun to finish")
    return counts


def _new_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """The records of the complete lines `path` gained past `offset`, and the new offset."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line being written is read next time
    records = []
    for line in data[:end].split(b"\n"):
        if line.strip():
            records.append(json.loads(line))
    return records, offset + end


def _rank_main(args: Any, keys: list[str], shard: str, env: dict, options: dict) -> None:
    """One rank: its engine on its GPUs, its items into its shard."""
    os.environ.update(env)
    from polymodal.caption import caption_files
    from polymodal.engine_args import engine_kwargs
    from polymodal.llm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    caption_files(llm, keys, shard, progress=False, **options)
