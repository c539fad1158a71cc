"""Inputs and crash-safe outputs of the batch jobs (`polymodal caption`, `polymodal transcribe`).

Inputs: folders (searched recursively for the job's media: image / video files for captions,
audio files for transcripts), glob patterns, list files
(`.txt` / `.lst` / `.list`: one path per line, relative to the list file; `#` comments) or
single files. Each item's key is its absolute path.

Outputs (by extension of `--out`):

* `.jsonl`: one JSON record per finished item, appended, flushed and fsync'ed before the next
  is written. A kill can at worst leave one torn last line; it is cut off on the next open.
* `.parquet`: finished records go to a JSONL journal next to it (`OUT.journal.jsonl`, same
  guarantees); at the end of a run journal + existing Parquet rows are compacted into a new
  file that atomically replaces `OUT`, then the journal is deleted. A run killed before that
  leaves the journal, and the next run resumes from Parquet + journal and compacts.

Readers dedupe by key (first record wins), so an item is never reported twice.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".m4a"}
VISUAL_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # what `polymodal caption` looks for
LIST_EXTENSIONS = {".txt", ".lst", ".list"}
RECORD_FIELDS = (
    "key", "kind", "caption", "error", "finish_reason", "prompt_tokens", "completion_tokens",
)  # fmt: skip


def media_kind(path: str | Path) -> str:
    """ "video" or "audio" for those file extensions, else "image"."""
    suffix = Path(path).suffix.lower()
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return "video" if suffix in VIDEO_EXTENSIONS else "image"


def _expand(spec: str, extensions: set[str]) -> Iterator[Path]:
    path = Path(spec)
    if path.is_dir():
        found = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        yield from sorted(found)
    elif any(ch in spec for ch in "*?["):
        yield from (Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file())
    elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entry = Path(line)
                yield entry if entry.is_absolute() else path.parent / entry
    else:
        yield path  # a single file (a missing one is recorded with its error later)


def discover_inputs(specs: Iterable[str], extensions: set[str] = VISUAL_EXTENSIONS) -> list[str]:
    """Absolute paths of all inputs named by `specs`, in order, without duplicates; folders
    contribute their files with `extensions` (globs, lists and named files are taken as is)."""
    seen: dict[str, None] = {}
    for spec in specs:
        for path in _expand(str(spec), extensions):
            seen.setdefault(os.path.abspath(path), None)
    return list(seen)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, skipping a torn last line and duplicate keys."""
    path = Path(path)
    if not path.exists():
        return []
    records: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:  # empty or torn line
            continue
        if isinstance(record, dict) and "key" in record:
            records.setdefault(record["key"], record)
    return list(records.values())


def read_records(out: str | Path) -> list[dict[str, Any]]:
    """All finished records of an output (JSONL, or Parquet plus its journal), deduped."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        return read_jsonl(out)
    rows: list[dict[str, Any]] = []
    if out.exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    rows += read_jsonl(journal_path(out))
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["key"], row)
    return list(unique.values())


def journal_path(out: str | Path) -> Path:
    """Where a Parquet output journals its records until compaction."""
    return Path(f"{out}.journal.jsonl")


class RecordWriter:
    """Appends finished records durably (the columns `fields`); `close()` compacts Parquet
    outputs."""

    def __init__(self, out: str | Path, fields: tuple[str, ...] = RECORD_FIELDS):
        self.out = Path(out)
        self.fields = fields
        self.is_parquet = self.out.suffix.lower() == ".parquet"
        self.path = journal_path(self.out) if self.is_parquet else self.out
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line (a kill in the middle of a write) before appending."""
        self._file.seek(0, os.SEEK_END)
        size = self._file.tell()
        if size == 0:
            return
        self._file.seek(size - 1)
        if self._file.read(1) == b"\n":
            return
        end = size  # scan back, 64 KiB at a time, for the last newline
        while end > 0:
            start = max(0, end - (1 << 16))
            self._file.seek(start)
            cut = self._file.read(end - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        self._file.truncate(end)
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; it is on disk when this returns."""
        line = json.dumps({k: record.get(k) for k in self.fields}, ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file; for Parquet, compact journal + old rows into OUT atomically."""
        self._file.close()
        if self.is_parquet:
            compact_parquet(self.out, self.fields)


def compact_parquet(out: str | Path, fields: tuple[str, ...] = RECORD_FIELDS) -> None:
    """Rewrite `out` from its rows plus its journal (deduped) as the columns `fields`, then
    delete the journal."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    rows = read_records(out)
    kinds = {"duration": pa.float64()}  # token counts are ints, the rest text
    schema = pa.schema(
        [(k, pa.int64() if k.endswith("_tokens") else kinds.get(k, pa.string())) for k in fields]
    )
    table = pa.Table.from_pylist([{k: r.get(k) for k in fields} for r in rows], schema)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)  # atomic: readers see the old or the new file, never half of one
    journal_path(out).unlink(missing_ok=True)
