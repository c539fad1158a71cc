"""`polymodal transcribe` on a tiny Whisper over generated audio files (wav, flac, ogg, mp3,
m4a): each transcript equals `Pipeline(audio=...)`'s text for that file; a corrupt file and a
clip longer than the window get error rows; a rerun after partial output does only the rest;
a finished job's rerun loads no model; a model without audio input, a language the model does
not know and Parquet output."""

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
    """Five clips in five containers, a corrupt WAV, a clip longer than the tiny model's 5 s
    window, and a text file; returns (all keys, bad key -> what its error says)."""
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
    bad = {str(folder / "broken.wav"): "audio 1", str(folder / "long.wav"): "longer than one"}
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
    assert "5 transcribed, 2 errors, 0 already done" in first.stderr
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
    missing = run(transcribe_cmd(no_weights, [tmp_path / "audio"], out))  # multilingual
    assert missing.returncode == 2 and "language= is required" in missing.stderr
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
        pipe.llm, keys, out, language="de", task="translate", params=params, progress=False,
        workers=1,
    )  # fmt: skip
    assert counts["done"] == 5 and counts["errors"] == 2
    rows = {r["key"]: r for r in read_records(out)}
    key = keys[0] if keys[0] not in bad else keys[1]
    ref = pipe(audio=key, language="de", task="translate", max_tokens=STEPS, temperature=0.0)
    assert rows[key]["text"] == ref.text and rows[key]["task"] == "translate"


def test_chat_models_get_an_instruction_whisper_gets_options():
    whisper = transcription_prompt("a.wav", True, language="en", task="translate")
    assert whisper == {
        "messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
        "language": "en",
        "task": "translate",
    }
    chat = transcription_prompt("a.wav", False, language="French")
    text = chat["messages"][0]["content"][1]["text"]
    assert text == "Transcribe the audio clip into text. The speech is in French."
    named = transcription_prompt("/x/a.wav", False, prompt="Transcribe {name}.", path="/x/a.wav")
    assert named["messages"][0]["content"][1]["text"] == "Transcribe a.wav."
