"""Whisper transcription (`polymodal.speech`, `processors/whisper_transcription.py`) vs
transformers' `WhisperForConditionalGeneration.generate` on a tiny random checkpoint (5 s
windows, timestamps `<|0.00|>` ... `<|5.00|>`), fp32 on the CPU, greedy:
- timestamps: every segment's tokens, start and end equal `generate(return_timestamps=True,
  return_segments=True)`'s;
- language detection: the detected language and the transcript equal `generate` without a
  language (`detect_language`);
- long-form: clips of 2-4 windows (features `truncation=False`), batched together with short
  ones, equal `generate`'s sequential long-form segments; with previous-context text too;
- the audio routes: json, text, verbose_json, srt, vtt, detection; word timestamps, an unknown
  format and an unknown language are refused naming the field."""

import io

import numpy as np
import pytest
import torch
import transformers as tf

from polymodal import Pipeline
from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.whisper_segments import split_window
from polymodal.server.audio_routes import subtitles
from tests.helpers import tiny_checkpoint

RATE = 16000


def clip(kind: str, seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    rng = np.random.default_rng(len(kind))
    waves = {
        "noise": lambda: rng.standard_normal(t.size) * 0.1,
        "low": lambda: np.sin(2 * np.pi * 100 * t) * 0.5,
        "high": lambda: np.sin(2 * np.pi * 850 * t) * 0.5,
        "sweep": lambda: (
            np.sin(2 * np.pi * (200 + 300 * np.sin(t)) * t) * 0.5
            + rng.standard_normal(t.size) * 0.05
        ),
    }
    return waves[kind]().astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "whisper")
    hf = tf.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, tf.WhisperFeatureExtractor.from_pretrained(path)


@pytest.fixture(scope="module")
def pipe(models):
    return Pipeline(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256)


def reference(models, audio: np.ndarray, **kwargs) -> tuple[list[tuple], np.ndarray]:
    """transformers' segments [(start, end, tokens)] and the features it decoded."""
    _, hf, extractor = models
    long = audio.size > extractor.n_samples
    options = {"truncation": False, "padding": "longest"} if long else {}
    features = extractor(audio, sampling_rate=RATE, return_tensors="pt", **options)
    out = hf.generate(features.input_features, do_sample=False, return_timestamps=True,
                      return_segments=True, **kwargs)  # fmt: skip
    segments = [(float(s["start"]), float(s["end"]), s["tokens"].tolist())
                for s in out["segments"][0]]  # fmt: skip
    return segments, features.input_features[0]


def ours(result) -> list[tuple]:
    return [(s.start, s.end, s.tokens) for s in result.segments]


def assert_same_segments(got: list[tuple], want: list[tuple]) -> None:
    assert [tokens for *_, tokens in got] == [tokens for *_, tokens in want]
    for (start, end, _), (ref_start, ref_end, _) in zip(got, want):
        assert start == pytest.approx(ref_start, abs=1e-9)
        assert end == pytest.approx(ref_end, abs=1e-9)


@pytest.mark.parametrize("kind", ["noise", "sweep", "high"])
def test_timestamps_match_generate(models, pipe, kind):
    audio = clip(kind, 3.0)
    want, _ = reference(models, audio, language="en", task="transcribe")
    result = pipe(audio=(audio, RATE), language="en", timestamps=True, temperature=0.0)
    assert_same_segments(ours(result), want)
    stamps = [t for *_, tokens in want for t in tokens if t > pipe.llm.processor.no_timestamps]
    assert len(stamps) >= 2  # the rules had timestamps to place
    assert result.text == pipe.llm.processor.decode_text([t for *_, tokens in want for t in tokens])
    assert [s.text for s in result.segments] == [
        pipe.llm.processor.decode_text(tokens) for *_, tokens in want
    ]


def test_language_detection_matches_generate(models, pipe):
    """No language: `detect_language` over the first window, then the transcript with it;
    the clips reach at least two different languages (the test is not vacuous)."""
    _, hf, extractor = models
    kinds = ["noise", "low", "high"]
    detected = set()
    results = pipe([{"audio": (clip(k, 3.0), RATE), "timestamps": True} for k in kinds],
                   temperature=0.0)  # fmt: skip
    for kind, result in zip(kinds, results):
        audio = clip(kind, 3.0)
        want, features = reference(models, audio)
        language_id = int(hf.detect_language(features[None])[0])
        assert pipe.llm.processor.language_id(result.language) == language_id
        detected.add(result.language)
        assert_same_segments(ours(result), want)
    assert len(detected) >= 2


def test_long_form_matches_generate_batched(models, pipe):
    """Clips of 2-4 windows and a short one in one batch: each equals its own `generate`."""
    clips = {"sweep": clip("sweep", 17.3), "noise": clip("noise", 9.0), "low": clip("low", 2.0)}
    requests = [{"audio": (a, RATE), "language": "de", "timestamps": k == "low"}
                for k, a in clips.items()]  # fmt: skip
    results = pipe(requests, temperature=0.0)
    for audio, result in zip(clips.values(), results):
        want, _ = reference(models, audio, language="de", task="transcribe")
        assert result.error is None
        assert_same_segments(ours(result), want)
        assert result.language == "de"
    long_segments = results[0].segments
    assert len({s.seek for s in long_segments}) >= 3  # seek moved through several windows
    assert long_segments[-1].end > 10.0
    assert [s.id for s in long_segments] == list(range(len(long_segments)))


def test_long_form_with_previous_text(models, pipe):
    """`text=` is `prompt_ids` before every window (condition_on_prev_tokens off)."""
    audio = clip("noise", 8.0)
    tokenizer = pipe.llm.tokenizer  # `get_prompt_ids`: <|startofprev|> + " the fox"
    prev = [tokenizer.convert_tokens_to_ids("<|startofprev|>")]
    prompt_ids = torch.tensor(prev + tokenizer.encode(" the fox", add_special_tokens=False))
    want, _ = reference(models, audio, language="fr", prompt_ids=prompt_ids)
    result = pipe(audio=(audio, RATE), language="fr", text="the fox", temperature=0.0)
    assert_same_segments(ours(result), want)


def test_without_timestamps_one_window_is_one_segment(models, pipe):
    audio = clip("high", 3.0)
    result = pipe(audio=(audio, RATE), language="en", temperature=0.0, max_tokens=6)
    assert result.segments is None and result.language == "en"
    assert result.usage.completion_tokens == len(result.token_ids) >= 6


def test_bad_requests_name_the_input(pipe):
    audio = (clip("low", 1.0), RATE)
    with pytest.raises(InvalidInputError, match="language='klingon'"):
        pipe(audio=audio, language="klingon")
    with pytest.raises(InvalidInputError, match="task='summarize'"):
        pipe(audio=audio, task="summarize")
    with pytest.raises(InvalidInputError, match="one audio clip"):
        pipe(audio=[audio, audio])


def test_split_window_follows_transformers_rules():
    """Pairs split segments; an unfinished tail is decoded again from the last pair; a single
    final timestamp or no pair consumes the window."""
    begin = 100
    tokens = [100, 5, 110, 110, 6, 120, 121, 7]  # a tail (7) after the last pair
    segments, advance = split_window(tokens, begin, 500)
    # a pair's second timestamp opens the next segment
    assert [s[2] for s in segments] == [[100, 5, 110], [110, 6, 120, 121]]
    assert segments[1][:2] == (pytest.approx(0.2), pytest.approx(0.4))
    assert advance == 40  # <|0.40|>: 20 steps of 2 frames
    segments, advance = split_window([100, 5, 110, 110, 6, 120], begin, 500)
    assert segments[-1][1] == pytest.approx(0.4) and advance == 500
    segments, advance = split_window([5, 6], begin, 300)
    assert segments == [(0.0, 3.0, [5, 6])] and advance == 300


def test_subtitles():
    from polymodal.processors.whisper_segments import Segment

    segments = [Segment(0, 0, 0.0, 1.5, " Hello", [1], 0.0),
                Segment(1, 0, 1.5, 1.5, "", [], 0.0),
                Segment(2, 0, 3661.25, 3662.0, " there.", [2], 0.0)]  # fmt: skip
    assert subtitles(segments, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello\n\n2\n01:01:01,250 --> 01:01:02,000\nthere.\n"
    )
    assert subtitles(segments, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello\n\n01:01:01.250 --> 01:01:02.000\nthere.\n"
    )


def test_transcription_routes(models, pipe):
    """The routes' text and segments equal `Pipeline(audio=...)`'s; verbose_json in OpenAI's
    shape; srt / vtt cues; the language detected when not given; bad fields named."""
    pytest.importorskip("fastapi")
    import soundfile
    from fastapi.testclient import TestClient

    from polymodal.async_engine import AsyncEngine
    from polymodal.server.app import create_app

    audio = clip("sweep", 7.0)  # two windows
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, RATE, format="WAV", subtype="FLOAT")
    wav = buffer.getvalue()
    want = pipe(audio=wav, language="fr", timestamps=True, temperature=0.0)
    translated = pipe(audio=wav, language="fr", task="translate", temperature=0.0)
    detected = pipe(audio=wav, task="transcribe", temperature=0.0)  # the route names its task
    engine = AsyncEngine(str(models[0]), separate_process=False, num_kv_blocks=128,
                         dtype="float32")  # fmt: skip
    files = {"file": ("a.wav", wav, "audio/wav")}
    form = {"model": "whisper", "language": "fr"}
    try:
        with TestClient(create_app(engine, "whisper")) as client:

            def post(path="/v1/audio/transcriptions", **fields):
                return client.post(path, data={**form, **fields}, files=files)

            assert post().json() == {"text": want.text}
            assert post("/v1/audio/translations").json() == {"text": translated.text}
            assert post(response_format="text").text == want.text
            verbose = post(response_format="verbose_json").json()
            assert verbose["task"] == "transcribe" and verbose["language"] == "french"
            assert verbose["duration"] == pytest.approx(7.0)
            assert verbose["text"] == want.text
            fields = {"id", "seek", "start", "end", "text", "tokens", "temperature",
                      "avg_logprob", "compression_ratio", "no_speech_prob"}  # fmt: skip
            assert all(set(s) == fields for s in verbose["segments"])
            got = [(s["start"], s["end"], s["tokens"]) for s in verbose["segments"]]
            assert_same_segments(got, ours(want))
            assert all(s["avg_logprob"] < 0 and 0 < s["no_speech_prob"] < 1
                       for s in verbose["segments"])  # fmt: skip
            srt = post(response_format="srt").text
            assert srt == subtitles(want.segments, "srt") and "-->" in srt
            assert post(response_format="vtt").text.startswith("WEBVTT\n\n")
            auto = client.post(
                "/v1/audio/transcriptions",
                files=files,
                data={"model": "whisper", "response_format": "verbose_json"},
            )
            assert auto.json()["text"] == detected.text
            assert auto.json()["language"] == tf.models.whisper.tokenization_whisper.LANGUAGES[
                detected.language
            ]  # fmt: skip
            bad = {
                "timestamp_granularities[]": ("word", "timestamp_granularities[]"),
                "response_format": ("xml", "response_format"),
                "language": ("klingon", "language"),
            }
            for field, (value, param) in bad.items():
                resp = post(**{field: value})
                assert resp.status_code == 400 and resp.json()["error"]["param"] == param
            assert post(**{"timestamp_granularities[]": "segment"}).status_code == 200
            words = post(response_format="verbose_json", **{"timestamp_granularities[]": "word"})
            assert words.status_code == 400 and "alignment_heads" in words.text
            resp = client.post("/v1/audio/transcriptions", data=form)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "file"
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_long_form_matches_generate(models):
    """On CUDA (Triton kernels, decode graphs; the timestamp rules on the device): long-form
    and detected-language transcripts, batched, equal transformers' on the CPU, fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = Pipeline(str(models[0]), dtype="float32", device="cuda", attention_backend="triton")
    clips = [clip("sweep", 17.3), clip("noise", 9.0), clip("high", 3.0)]
    results = gpu([{"audio": (a, RATE), "timestamps": True} for a in clips], temperature=0.0)
    for audio, result in zip(clips, results):
        want, _ = reference(models, audio)
        assert_same_segments(ours(result), want)
