"""`polymodal transcribe` on a tiny Whisper over generated audio files (wav, flac, ogg, mp3,
m4a): each transcript equals `Pipeline(audio=...)`'s text for that file, a clip longer than the
window included (long-form); a corrupt file gets an error row; a rerun after partial output
does only the rest; a finished job's rerun loads no model; a model without audio input, a
language the model does not know; Parquet output with detected languages and segments."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from polymodal.caption_io import AUDIO_EXTENSIONS, discover_inputs, read_records
from polymodal.transcribe import transcription_prompt
from tests.helpers import tiny_checkpoint
from tests.processors.audio_signals import chirp, encode, noise, tone, vowels

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RATE = 16_000
STEPS = 6
ENGINE = ["--num-kv-blocks", "128", "--dtype", "float32"]


def make_audio(folder) -> tuple[list[str], dict[str, str]]:
    """Five clips in five containers, a clip longer than the tiny model's 5 s window, a corrupt
    WAV and a text file; returns (all keys, bad key -> what its error says)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = {
        "tone.wav": tone(440.0, 1.5, RATE),
        "chirp.flac": chirp(2.0, RATE),
        "noise.ogg": noise(1.0, RATE, seed=3),
        "vowels.mp3": vowels(2.5, RATE),
        "sub/tone.m4a": tone(300.0, 1.0, 22_050),
        "long.wav": tone(200.0, 7.0, RATE),
    }
    for name, samples in clips.items():
        rate = 22_050 if name.endswith("m4a") else RATE
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(encode(samples, rate, name.rsplit(".", 1)[1]))
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    (folder / "notes.txt").write_text("not audio: ignored by folder discovery")
    keys = discover_inputs([str(folder)], AUDIO_EXTENSIONS)
    bad = {str(folder / "broken.wav"): "audio 1"}
    return keys, bad


def transcribe_cmd(ckpt, inputs, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "polymodal.cli", "transcribe", *map(str, inputs),
        "--model", str(ckpt), "--out", str(out), "--max-tokens", str(STEPS), "--no-progress",
        *ENGINE, *extra,
    ]  # fmt: skip


def run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "whisper")


@pytest.fixture(scope="module")
def pipe(whisper):
    from polymodal import Pipeline

    return Pipeline(str(whisper), num_kv_blocks=128, dtype="float32")


def test_transcripts_equal_the_pipeline_and_resume(whisper, pipe, tmp_path):
    keys, bad = make_audio(tmp_path / "audio")
    assert len(keys) == 7 and not any(k.endswith(".txt") for k in keys)
    out = tmp_path / "transcripts.jsonl"
    cmd = transcribe_cmd(whisper, [tmp_path / "audio"], out, "--language", "en")
    first = run(cmd + ["--batch-size", "3"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 transcribed, 1 errors, 0 already done" in first.stderr
    rows = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == sorted(keys)
    for key, what in bad.items():
        assert what in rows[key]["error"] and rows[key]["text"] is None
    expected = {}
    for key in keys:
        if key in bad:
            continue
        ref = pipe(audio=key, language="en", max_tokens=STEPS, temperature=0.0)
        expected[key] = ref.text
        assert rows[key]["text"] == ref.text, key
        assert rows[key]["completion_tokens"] == len(ref.token_ids) >= 1
        assert rows[key]["language"] == "en" and rows[key]["task"] == "transcribe"
    assert len(set(expected.values())) > 1  # different audio, different transcripts

    # partial output: the first 3 records and a torn line, as a kill would leave them
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + '\n{"key": "/torn/rec')
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    done_now = re.search(r"(\d+) transcribed, (\d+) errors, 3 already done", again.stderr)
    assert done_now and int(done_now[1]) + int(done_now[2]) == 4, again.stderr
    rows_again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["key"] for r in rows_again) == sorted(keys)  # each file exactly once
    assert {r["key"]: r["text"] for r in rows_again if r["key"] in expected} == expected

    # nothing left: the job ends before any model is loaded (this one does not exist)
    done = run(transcribe_cmd(tmp_path / "no-such-model", [tmp_path / "audio"], out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 transcribed, 0 errors, 7 already done" in done.stderr
    assert "the model was not loaded" in done.stderr


def test_a_model_without_audio_or_a_bad_language_is_refused_before_weights(whisper, tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(encode(tone(440.0, 0.5, RATE), RATE, "wav"))
    out = tmp_path / "t.jsonl"
    # a text-only model: only its config.json exists, so any weight loading would fail
    text_model = tmp_path / "text-model"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    refused = run(transcribe_cmd(text_model, [tmp_path / "audio"], out))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "takes no audio input" in refused.stderr and "Qwen2ForCausalLM" in refused.stderr
    # Whisper without its weights: the language is checked from the processor files alone
    no_weights = tmp_path / "whisper-no-weights"
    shutil.copytree(whisper, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    bad = run(transcribe_cmd(no_weights, [tmp_path / "audio"], out, "--language", "klingon"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "language='klingon'" in bad.stderr
    task = run(transcribe_cmd(no_weights, [tmp_path / "audio"], out, "--task", "summarize"))
    assert task.returncode == 2 and "invalid choice: 'summarize'" in task.stderr
    assert not out.exists()  # no record of a job that never started


def test_transcribe_files_to_parquet_and_translate(pipe, tmp_path):
    pytest.importorskip("pyarrow")
    from polymodal import SamplingParams
    from polymodal.transcribe import transcribe_files

    keys, bad = make_audio(tmp_path / "audio")
    out = tmp_path / "t.parquet"
    params = SamplingParams(max_tokens=STEPS, temperature=0.0)
    params = params.with_defaults(pipe.llm.default_sampling)  # as Pipeline does
    counts = transcribe_files(
        pipe.llm, keys, out, task="translate", timestamps=True, params=params, progress=False,
        workers=1,
    )  # fmt: skip
    assert counts["done"] == 6 and counts["errors"] == 1
    rows = {r["key"]: r for r in read_records(out)}
    for key in (k for k in keys if k not in bad):
        ref = pipe(audio=key, task="translate", timestamps=True, max_tokens=STEPS,
                   temperature=0.0)  # fmt: skip
        row = rows[key]
        assert row["text"] == ref.text and row["task"] == "translate"
        assert row["language"] == ref.language  # detected
        assert row["duration"] > 0
        pieces = [{"start": s.start, "end": s.end, "text": s.text} for s in ref.segments]
        assert json.loads(row["segments"]) == pieces


def test_chat_models_get_an_instruction():
    chat = transcription_prompt("a.wav", language="French")
    text = chat["messages"][0]["content"][1]["text"]
    assert text == "Transcribe the audio clip into text. The speech is in French."
    named = transcription_prompt("/x/a.wav", prompt="Transcribe {name}.", path="/x/a.wav")
    assert named["messages"][0]["content"][1]["text"] == "Transcribe a.wav."


def test_speech_flags(whisper, pipe, tmp_path):
    """`--condition-on-prev-tokens` and the fallback flags reach the transcription (the
    record equals `Pipeline(audio=...)` with the same options); options that cannot work are
    refused before the weights load, naming the flag."""
    from polymodal.transcribe import fallback_temperatures

    assert fallback_temperatures(0.0, 0.2) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert fallback_temperatures(0.3, None) is None
    (tmp_path / "audio").mkdir()
    clip = tmp_path / "audio" / "long.wav"
    clip.write_bytes(encode(chirp(12.0, RATE), RATE, "wav"))
    out = tmp_path / "t.jsonl"
    flags = ["--language", "de", "--condition-on-prev-tokens", "--logprob-threshold", "-100",
             "--temperature-increment-on-fallback", "0.5", "--timestamps"]  # fmt: skip
    done = run(transcribe_cmd(whisper, [clip], out, *flags))
    assert done.returncode == 0, done.stderr
    row = read_records(out)[0]
    ref = pipe(audio=str(clip), language="de", condition_on_prev_tokens=True, timestamps=True,
               temperature=(0.0, 0.5, 1.0), logprob_threshold=-100, max_tokens=STEPS)  # fmt: skip
    assert row["text"] == ref.text and len(json.loads(row["segments"])) == len(ref.segments)
    no_weights = tmp_path / "whisper-no-weights"
    shutil.copytree(whisper, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    for extra, says in ((["--word-timestamps"], "alignment_heads"),
                        (["--no-speech-threshold", "0.5"], "needs logprob_threshold")):  # fmt: skip
        bad = run(transcribe_cmd(no_weights, [clip], tmp_path / "x.jsonl", *extra))
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert says in bad.stderr
