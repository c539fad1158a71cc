"""Whisper word timestamps (`processors/whisper_words.py`, the cross-attention pass of
`llm_core/models/whisper_alignment.py`) vs transformers on the same tiny random checkpoint
(alignment heads added to its generation config), fp32 on the CPU:
- the alignment heads' cross-attention equals transformers' eager attention weights;
- each segment's token timestamps equal `generate(return_token_timestamps=True,
  return_segments=True)`'s (one window, and long-form clips with conditioning);
- words group tokens as transformers' `_combine_tokens_into_words`, spaced and unspaced;
- a checkpoint without alignment heads is refused, naming them."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers as tf
from transformers.models.whisper import tokenization_whisper as tw

from polymodal import Pipeline
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.models.whisper_alignment import cross_attention_weights
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.whisper_words import split_words
from polymodal.speech import run_transcriptions
from tests.helpers import tiny_checkpoint
from tests.sdk.test_speech import RATE, clip

HEADS = [[1, 0], [1, 3], [0, 2]]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """(checkpoint with alignment heads, transformers' model, extractor, our Pipeline)."""
    path = tmp_path_factory.mktemp("aligned") / "whisper"
    shutil.copytree(tiny_checkpoint(tmp_path_factory, "whisper"), path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "alignment_heads": HEADS}))
    hf = tf.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    extractor = tf.WhisperFeatureExtractor.from_pretrained(path)
    pipe = Pipeline(str(path), dtype="float32", device="cpu", num_kv_blocks=256)
    return path, hf, extractor, pipe


def features_of(extractor, audio):
    long = audio.size > extractor.n_samples
    options = {"truncation": False, "padding": "longest"} if long else {}
    return extractor(audio, sampling_rate=RATE, return_tensors="pt",
                     return_attention_mask=True, **options)  # fmt: skip


def test_cross_attention_matches_eager(aligned):
    _, hf, extractor, pipe = aligned
    features = features_of(extractor, clip("sweep", 3.0)).input_features
    tokens = [480, 481, 485, 489, 40, 41, 300, 12]
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        out = hf(features, decoder_input_ids=torch.tensor([tokens]), output_attentions=True)
    want = torch.stack([out.cross_attentions[layer][0, head] for layer, head in HEADS])
    got = cross_attention_weights(pipe.llm.engine.runner.model, features[0], tokens, HEADS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def transcribe(pipe, audio, **options):
    params = SamplingParams(temperature=0.0).with_defaults(pipe.llm.default_sampling)
    options = {"language": "de", "word_timestamps": True, **options}
    done = next(run_transcriptions(pipe.llm, [(0, (audio, RATE), params, options)], workers=1))
    if done.error is not None:
        raise done.error
    return done.output


CASES = [("sweep", 3.0, False), ("noise", 4.0, False), ("sweep", 17.3, True), ("noise", 9.0, False)]


@pytest.mark.parametrize("kind,seconds,condition", CASES)
def test_token_timestamps_match_generate(aligned, kind, seconds, condition):
    _, hf, extractor, pipe = aligned
    audio = clip(kind, seconds)
    inputs = features_of(extractor, audio)
    out = hf.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                      do_sample=False, return_timestamps=True, return_segments=True,
                      return_token_timestamps=True, language="de",
                      condition_on_prev_tokens=condition)  # fmt: skip
    want = out["segments"][0]
    got = transcribe(pipe, audio, timestamps=True, condition_on_prev_tokens=condition)
    assert [s.tokens for s in got.segments] == [s["tokens"].tolist() for s in want]
    for ours, theirs in zip(got.segments, want):
        np.testing.assert_allclose(ours.token_timestamps, theirs["token_timestamps"].tolist(),
                                   atol=0.02 + 1e-6)  # fmt: skip
    stamps = [t for s in got.segments for t in s.token_timestamps]
    assert len(set(stamps)) > 2  # the times move through the clip
    words = [w for s in got.segments for w in s.words]
    assert words and all(w.start <= w.end for w in words)
    whole = [s for s in got.segments if "\ufffd" not in s.text]  # random bytes split apart
    assert whole and all("".join(w.word for w in s.words) == s.text for s in whole)


class _Tokenizer:
    """transformers' word functions read `eos_token_id` (first special id) and `decode`."""

    def __init__(self, tokenizer, eos):
        self.tokenizer, self.eos_token_id, self.language = tokenizer, eos, None

    def decode(self, ids, **_):
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("unspaced", [False, True])
def test_words_group_as_transformers(aligned, unspaced):
    _, _, _, pipe = aligned
    tokenizer = pipe.llm.tokenizer
    text = ' "Hello, world!" (the fox) jumps... over-the dog. über ça'
    tokens = tokenizer.encode(text, add_special_tokens=False)
    shim = _Tokenizer(tokenizer, eos=len(tokenizer))
    language = "japanese" if unspaced else "english"
    want_words, _, want_indices = tw._combine_tokens_into_words(shim, tokens, language)
    words, indices = split_words(tokenizer.decode, tokens, unspaced)
    assert (words, indices) == (want_words, want_indices)
    assert len(words) >= 6


def test_without_alignment_heads_word_timestamps_are_refused(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "whisper")
    pipe = Pipeline(str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    with pytest.raises(InvalidInputError, match="alignment_heads"):
        transcribe(pipe, clip("low", 1.0))


@pytest.mark.parametrize("separate_process", [False, True])
def test_transcription_route_words_and_fallback_fields(aligned, separate_process):
    """`timestamp_granularities[]=word` gives verbose_json `words` equal to the Pipeline's,
    whether the engine runs in this process or its own (the alignment pass crosses the pipe);
    the fallback fields reach the transcription; bad fields are named."""
    pytest.importorskip("fastapi")
    import io

    import soundfile
    from fastapi.testclient import TestClient

    from polymodal.async_engine import AsyncEngine
    from polymodal.server.app import create_app

    path, _, _, pipe = aligned
    audio = clip("sweep", 7.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, RATE, format="WAV", subtype="FLOAT")
    wav = buffer.getvalue()
    want = pipe(audio=wav, language="de", word_timestamps=True, temperature=0.0,
                condition_on_prev_tokens=True, logprob_threshold=-100.0)  # fmt: skip
    engine = AsyncEngine(str(path), separate_process=separate_process, num_kv_blocks=128,
                         dtype="float32", device="cpu")  # fmt: skip
    files = {"file": ("a.wav", wav, "audio/wav")}
    form = {"model": "whisper", "language": "de", "response_format": "verbose_json"}
    try:
        with TestClient(create_app(engine, "whisper")) as client:

            def post(**fields):
                data = {**form, **fields}
                return client.post("/v1/audio/transcriptions", data=data, files=files)

            body = post(**{"timestamp_granularities[]": "word", "condition_on_prev_tokens":
                           "true", "logprob_threshold": "-100"}).json()  # fmt: skip
            assert "segments" not in body and body["text"] == want.text
            words = [w.to_dict() for s in want.segments for w in s.words]
            assert body["words"] == words and len(words) >= 3
            bad = {"no_speech_threshold": ("0.5", "no_speech_threshold"),
                   "logprob_threshold": ("low", "logprob_threshold"),
                   "condition_on_prev_tokens": ("maybe", "condition_on_prev_tokens")}  # fmt: skip
            for field, (value, param) in bad.items():
                resp = post(**{field: value})
                assert resp.status_code == 400 and resp.json()["error"]["param"] == param
            resp = post(response_format="json", **{"timestamp_granularities[]": "word"})
            assert resp.status_code == 400
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_words_fallback_and_conditioning(aligned):
    """On CUDA (Triton kernels, decode graphs, the alignment pass on the device): token
    timestamps, conditioned long-form segments and fallback retries equal transformers' on
    the CPU, fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path, hf, extractor, _ = aligned
    gpu = Pipeline(str(path), dtype="float32", device="cuda", attention_backend="triton")
    audio = clip("sweep", 17.3)
    inputs = features_of(extractor, audio)
    options = dict(condition_on_prev_tokens=True, temperature=(0.0, 0.0), logprob_threshold=-1.0)
    out = hf.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                      do_sample=False, return_timestamps=True, return_segments=True,
                      return_token_timestamps=True, language="de", **options)  # fmt: skip
    want = out["segments"][0]
    got = gpu(audio=(audio, RATE), language="de", word_timestamps=True, **options)
    assert [s.tokens for s in got.segments] == [s["tokens"].tolist() for s in want]
    for ours, theirs in zip(got.segments, want):
        np.testing.assert_allclose(ours.token_timestamps, theirs["token_timestamps"].tolist(),
                                   atol=0.02 + 1e-6)  # fmt: skip
