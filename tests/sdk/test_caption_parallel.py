"""`polymodal caption --data-parallel-size N`: N processes, each its own engine, give the captions
of one process (greedy), each input once, errors recorded, the shards merged and removed; a
killed run's shards count as done on the rerun (parallel or not)."""

from __future__ import annotations

import json
import subprocess

import pytest

from polymodal.caption_io import read_records
from polymodal.caption_parallel import merge_shards, shard_files
from tests.helpers import tiny_checkpoint
from tests.sdk.test_caption import ENV, caption_cmd, make_inputs

pytestmark = pytest.mark.timeout(300)


def _captions(out) -> dict[str, str | None]:
    return {r["key"]: r.get("caption", r.get("error")) for r in read_records(out)}


def test_two_ranks_caption_as_one_process(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    keys, bad = make_inputs(tmp_path / "media", 6)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ("--max-tokens", "12", "--device", "cpu", "--no-progress")
    subprocess.run(caption_cmd(ckpt, [tmp_path / "media"], one, *args), env=ENV, check=True,
                   capture_output=True)  # fmt: skip
    done = subprocess.run(
        caption_cmd(ckpt, [tmp_path / "media"], two, *args, "--data-parallel-size", "2"),
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 captioned, 2 errors, 0 already done" in done.stderr
    assert _captions(two) == _captions(one) and set(_captions(two)) == set(keys)
    assert all(r.get("error") for r in read_records(two) if r["key"] in bad)
    assert not shard_files(two) and two.read_bytes().count(b"\n") == len(keys)
    again = subprocess.run(
        caption_cmd(ckpt, [tmp_path / "media"], two, *args, "--data-parallel-size", "2"),
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert "nothing to do" in again.stderr


def test_a_killed_runs_shards_count_as_done(tmp_path):
    """Shards left beside the output (a parallel run killed midway) are merged into it, each key
    once, before anything is planned; then removed."""
    out = tmp_path / "captions.jsonl"
    out.write_text(json.dumps({"key": "/a", "caption": "first"}) + "\n")
    shard = tmp_path / "captions.jsonl.rank0.jsonl"
    shard.write_text("\n".join(json.dumps({"key": k, "caption": c})
                               for k, c in (("/a", "dup"), ("/b", "second"))) + "\n")  # fmt: skip
    (tmp_path / "captions.jsonl.rank1.jsonl").write_text(
        json.dumps({"key": "/c", "caption": "third"}) + "\n" + '{"key": "/d", "capt'
    )  # a torn last line: not a record
    assert merge_shards(out) == 2
    assert _captions(out) == {"/a": "first", "/b": "second", "/c": "third"}
    assert not shard_files(out)
