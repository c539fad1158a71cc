"""`polymodal caption`: SIGKILL midway + rerun = every input exactly once; errors recorded;
prompt templates keep literal braces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from polymodal.caption_io import RecordWriter, discover_inputs, read_records
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def make_inputs(folder, n_good: int) -> tuple[list[str], set[str]]:
    """`n_good` small PNGs plus a corrupt PNG and a corrupt MP4; returns (all keys, bad keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        Image.new("RGB", (32 + i % 5, 28), (i * 7 % 256, 90, 160)).save(folder / f"img{i:03d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "notes.md").write_text("not media: ignored by folder discovery")
    keys = discover_inputs([str(folder)])
    return keys, {str(folder / "broken.png"), str(folder / "broken.mp4")}


def caption_cmd(ckpt, inputs, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "polymodal.cli", "caption", *map(str, inputs),
        "--model", str(ckpt), "--out", str(out), "--num-kv-blocks", "256", *extra,
    ]  # fmt: skip


def lines_of(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_midway_then_rerun_has_each_input_once(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    keys, bad = make_inputs(tmp_path / "media", 30)
    assert len(keys) == 32  # notes.md is not media
    out = tmp_path / "captions.jsonl"
    cmd = caption_cmd(ckpt, [tmp_path / "media"], out, "--batch-size", "1", "--max-tokens", "200")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while lines_of(out) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill:\n{stderr[-2000:]}"
    killed_at = lines_of(out)
    assert 5 <= killed_at < len(keys)
    with open(out, "ab") as f:  # what a kill in the middle of a write could leave behind
        f.write(b'{"key": "/torn/rec')
    rerun = subprocess.run(
        cmd + ["--no-progress"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{killed_at} already done" in rerun.stderr
    raw = [json.loads(line) for line in out.read_text().splitlines()]  # no torn line left
    assert sorted(r["key"] for r in raw) == sorted(keys)  # each input exactly once
    errors = {r["key"]: r["error"] for r in raw if r["error"]}
    assert set(errors) == bad
    assert "image 1" in errors[str(tmp_path / "media" / "broken.png")]
    assert "video 1" in errors[str(tmp_path / "media" / "broken.mp4")]
    assert all(r["caption"] and r["completion_tokens"] for r in raw if r["key"] not in bad)
    # nothing left to do: the job ends before any model is loaded (this one does not exist)
    again_cmd = caption_cmd(tmp_path / "no-such-model", [tmp_path / "media"], out, "--no-progress")
    again = subprocess.run(again_cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 captioned, 0 errors, 32 already done" in again.stderr
    assert "the model was not loaded" in again.stderr
    assert lines_of(out) == len(keys)


def test_parquet_output_globs_and_list_files(tmp_path_factory, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    keys, bad = make_inputs(tmp_path / "media", 4)
    listing = tmp_path / "more.txt"
    listing.write_text("# relative to the list file\nmedia/img000.png\nmedia/missing.png\n")
    out = tmp_path / "captions.parquet"
    inputs = [f"{tmp_path}/media/*.png", listing]
    cmd = caption_cmd(ckpt, inputs, out, "--max-tokens", "6", "--prompt", "Name: {name}")
    cmd += ["--max-pixels", "4096", "--no-progress"]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = pq.read_table(out).to_pylist()
    expected = {k for k in keys if k.endswith(".png")} | {str(tmp_path / "media/missing.png")}
    assert sorted(r["key"] for r in rows) == sorted(expected)
    missing = next(r for r in rows if r["key"].endswith("missing.png"))
    assert "no such file" in missing["error"]
    assert not (tmp_path / "captions.parquet.journal.jsonl").exists()
    # a journal left by a killed run (including a duplicate) is merged on the next run
    writer = RecordWriter(out)
    writer.write({"key": rows[0]["key"], "caption": "duplicate, ignored"})
    writer._file.close()  # simulate the kill: no compaction
    assert len(read_records(out)) == len(expected)
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert f"{len(expected)} already done" in rerun.stderr
    assert pq.read_table(out).num_rows == len(expected)


def test_caption_files_fills_the_batch_and_bounds_the_prefetch(tmp_path, monkeypatch):
    """Default: `max_num_seqs` requests in flight; media processed at most PREFETCH ahead."""
    from types import SimpleNamespace

    from polymodal import caption, feeder

    monkeypatch.setattr(feeder, "PREFETCH", 3)
    counts = {"started": 0, "added": 0, "ahead": 0, "running": 0}

    class Engine:
        scheduler = SimpleNamespace(max_num_seqs=5)

        def __init__(self):
            self.left = {}

        def add_processed(self, *_, **__):
            counts["added"] += 1
            rid = str(counts["added"])
            self.left[rid] = 3  # steps until it finishes
            counts["running"] = max(counts["running"], len(self.left))
            return rid

        def has_unfinished(self):
            return bool(self.left)

        def step(self, finished_only=False):
            assert finished_only  # the job reads finished requests only
            time.sleep(0.005)  # a step takes longer than processing one item, as on a GPU
            outs = []
            for rid in list(self.left):
                self.left[rid] -= 1
                if not self.left[rid]:
                    del self.left[rid]
                    text = SimpleNamespace(text=f"caption {rid}", finish_reason="length")
                    usage = SimpleNamespace(prompt_tokens=4, completion_tokens=2)
                    outs.append(SimpleNamespace(finished=True, request_id=rid, outputs=[text],
                                                usage=usage))  # fmt: skip
            return outs

        def abort(self, rid):
            self.left.pop(rid, None)

    def prepare(request, params):
        counts["started"] += 1
        counts["ahead"] = max(counts["ahead"], counts["started"] - counts["added"])
        return SimpleNamespace(token_ids=[1, 2], positions=None, mrope_delta=0, mm_items=[]), None

    llm = SimpleNamespace(engine=Engine(), prepare=prepare)
    paths = [f"/data/img{i}.png" for i in range(12)]
    done = caption.caption_files(llm, paths, tmp_path / "out.jsonl", workers=1, progress=False)
    assert {k: done[k] for k in ("done", "errors", "skipped")} == {"done": 12, "errors": 0,
                                                                   "skipped": 0}  # fmt: skip
    assert done["seconds"] > 0
    assert counts["running"] == 5  # the engine's whole batch, not a fixed 16
    assert counts["ahead"] <= 3 + 1  # the window, plus the one being handed over
    assert sorted(r["key"] for r in read_records(tmp_path / "out.jsonl")) == sorted(paths)


def test_prompt_braces_other_than_the_placeholders_stay_as_written():
    from polymodal.caption import build_prompt

    template = 'Answer as JSON like {"caption": "...", "tags": []} for the {kind} {name} ({path}).'
    prompt = build_prompt("/data/cat.png", template, {"max_pixels": 4096})
    text = prompt["messages"][0]["content"][-1]["text"]
    expected = 'Answer as JSON like {"caption": "...", "tags": []} for the image cat.png'
    assert text == expected + " (/data/cat.png)."
    assert prompt["max_pixels"] == 4096
