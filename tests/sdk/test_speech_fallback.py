"""Whisper's temperature fallback and `condition_on_prev_tokens` (`Transcription`) vs
transformers' `generate` on the same tiny random checkpoint, fp32 on the CPU:
- greedy with `condition_on_prev_tokens=True` over clips of 2-4 windows (with previous text
  too): the same segments;
- thresholds the greedy windows fail, with `temperature=(0.0, 0.0)` (a deterministic retry):
  the same retries window by window (transformers' `_need_fallback` recorded) and segments;
  a no-speech threshold between the windows' no-speech probabilities: the same windows
  skipped;
- a retry at temperature 1.0 (seeded sampling): the window's segments and tokens come from
  the accepted attempt, and the next window is not conditioned on it."""

import pytest
import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.whisper_segments import token_compression_ratio
from polymodal.processors.whisper_transcription import Transcription
from polymodal.speech import run_transcriptions
from tests.sdk.test_speech import RATE, assert_same_segments, clip, models, ours, pipe, reference

__all__ = ["models", "pipe"]  # the fixtures


def transcribe(pipe, audio, temperature=0.0, **options):
    params = SamplingParams(temperature=temperature).with_defaults(pipe.llm.default_sampling)
    options.setdefault("language", "de")
    done = next(run_transcriptions(pipe.llm, [(0, (audio, RATE), params, options)], workers=1))
    if done.error is not None:
        raise done.error
    return done.output


def record(obj, name: str, calls: list):
    """Wrap `obj.name` so each return value is appended to `calls`."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    return original, wrapped


@pytest.mark.parametrize("kind,seconds", [("sweep", 17.3), ("noise", 9.0)])
def test_condition_on_prev_tokens_matches_generate(models, pipe, kind, seconds):
    audio = clip(kind, seconds)
    want, _ = reference(models, audio, language="de", condition_on_prev_tokens=True)
    got = transcribe(pipe, audio, condition_on_prev_tokens=True)
    assert_same_segments(ours(got), want)
    assert len({s.seek for s in got.segments}) >= 2
    unconditioned, _ = reference(models, audio, language="de")
    assert [s[2] for s in want] != [s[2] for s in unconditioned]  # the context mattered


def test_condition_on_prev_tokens_with_previous_text(models, pipe):
    audio = clip("sweep", 12.0)
    tokenizer = pipe.llm.tokenizer
    prev = [tokenizer.convert_tokens_to_ids("<|startofprev|>")]
    prompt_ids = torch.tensor(prev + tokenizer.encode(" the fox", add_special_tokens=False))
    want, _ = reference(models, audio, language="de", prompt_ids=prompt_ids,
                        condition_on_prev_tokens=True)  # fmt: skip
    got = transcribe(pipe, audio, previous_text="the fox", condition_on_prev_tokens=True)
    assert_same_segments(ours(got), want)


def fallback_paths(models, pipe, monkeypatch, audio, **options):
    """Run both with `options`; (their segments, transformers' and our per-attempt
    (retry, skip) decisions)."""
    _, hf, _ = models
    theirs: list = []
    original, wrapped = record(hf, "_need_fallback", theirs)
    monkeypatch.setattr(hf, "_need_fallback", wrapped)
    want, _ = reference(models, audio, language="de", temperature=(0.0, 0.0), **options)
    monkeypatch.setattr(hf, "_need_fallback", original)
    mine: list = []
    original, wrapped = record(Transcription, "_judge", mine)
    monkeypatch.setattr(Transcription, "_judge", lambda self, c: wrapped(self, c))
    got = transcribe(pipe, audio, temperatures=(0.0, 0.0), **options)
    return got, want, [tuple(d) for d in theirs], mine


def test_logprob_threshold_retries_as_generate(models, pipe, monkeypatch):
    """A threshold between the windows' avg logprobs: some windows retried (at 0.0 again, so
    deterministic), the same ones as transformers'."""
    audio = clip("sweep", 17.3)
    plain = transcribe(pipe, audio, details=True)
    by_window = {s.seek: s.avg_logprob for s in plain.segments}
    values = sorted(by_window.values())
    threshold = (values[0] + values[-1]) / 2
    got, want, theirs, mine = fallback_paths(models, pipe, monkeypatch, audio,
                                             logprob_threshold=threshold)  # fmt: skip
    assert_same_segments(ours(got), want)
    assert mine == theirs
    assert (True, False) in mine and (False, False) in mine  # some windows retried, some not


def test_compression_ratio_threshold_retries_as_generate(models, pipe, monkeypatch):
    """A threshold between the windows' token compression ratios (end-of-text included)."""
    audio = clip("sweep", 17.3)
    ratios = []
    judge = Transcription._judge

    def judge_and_note(self, completion):
        tokens = list(completion.token_ids)
        ratios.append(token_compression_ratio(tokens, self.processor.vocab_size))
        return judge(self, completion)

    monkeypatch.setattr(Transcription, "_judge", judge_and_note)
    transcribe(pipe, audio)
    monkeypatch.setattr(Transcription, "_judge", judge)
    assert min(ratios) < max(ratios)
    got, want, theirs, mine = fallback_paths(
        models, pipe, monkeypatch, audio, compression_ratio_threshold=sum(ratios) / len(ratios)
    )
    assert_same_segments(ours(got), want)
    assert mine == theirs and (True, False) in mine and (False, False) in mine


def test_no_speech_threshold_skips_as_generate(models, pipe, monkeypatch):
    """Every window under the logprob threshold; the no-speech threshold between the windows'
    no-speech probabilities: the windows above it are skipped, as transformers skips them."""
    audio = clip("sweep", 17.3)
    plain = transcribe(pipe, audio, details=True)
    probs = sorted({s.no_speech_prob for s in plain.segments})
    assert len(probs) >= 2
    threshold = (probs[0] + probs[-1]) / 2
    got, want, theirs, mine = fallback_paths(
        models, pipe, monkeypatch, audio, logprob_threshold=0.0, no_speech_threshold=threshold
    )
    assert_same_segments(ours(got), want)
    assert mine == theirs
    assert (False, True) in mine and (True, False) in mine  # skipped and retried windows
    assert got.segments and len(got.segments) < len(plain.segments)


def test_hot_retry_keeps_the_accepted_attempt(pipe, monkeypatch):
    """Every greedy window fails (logprob threshold 0): each is decoded again at 1.0 (seeded)
    and kept; its segments carry temperature 1.0 and the tokens of that attempt, and the
    window after a hot one is not conditioned on it."""
    audio = clip("sweep", 12.0)
    outputs, prompts = [], []
    original = Transcription.add_output

    def add_output(self, tag, output):
        if tag == "window":
            outputs.append((self.temperature, list(output.outputs[0].token_ids)))
        return original(self, tag, output)

    original_requests = Transcription.requests

    def requests(self):
        batch = original_requests(self)
        prompts.extend(list(p.token_ids) for tag, p, _ in batch if tag == "window")
        return batch

    monkeypatch.setattr(Transcription, "add_output", add_output)
    monkeypatch.setattr(Transcription, "requests", requests)
    got = transcribe(pipe, audio, temperature=0.0, temperatures=(0.0, 1.0),
                     logprob_threshold=0.0, condition_on_prev_tokens=True)  # fmt: skip
    assert [t for t, _ in outputs] == [0.0, 1.0] * (len(outputs) // 2)
    accepted = [tokens for t, tokens in outputs if t == 1.0]
    assert got.token_ids == [t for tokens in accepted for t in tokens]
    assert all(s.temperature == 1.0 for s in got.segments)
    prev = pipe.llm.processor.prev
    assert len(accepted) >= 2 and all(p[0] != prev for p in prompts)  # never conditioned


@pytest.mark.parametrize("top_k", [None, 5])
def test_retries_sample_from_top_k_as_generate(pipe, monkeypatch, top_k):
    """With fallback temperatures, the windows sample from transformers' default top_k (50)
    unless the request sets its own."""
    seen = []
    original = Transcription.requests

    def requests(self):
        batch = original(self)
        seen.extend(params.top_k for tag, _, params in batch if tag == "window")
        return batch

    monkeypatch.setattr(Transcription, "requests", requests)
    params = SamplingParams(temperature=0.0, **({} if top_k is None else {"top_k": top_k}))
    options = {"language": "de", "temperatures": (0.0, 1.0), "logprob_threshold": 0.0}
    job = (0, (clip("sweep", 4.0), RATE), params, options)
    done = next(run_transcriptions(pipe.llm, [job], workers=1))
    assert done.error is None and len(seen) >= 2  # greedy attempts and their retries
    assert seen == [top_k or 50] * len(seen)
    transcribe(pipe, clip("sweep", 4.0), temperature=0.5)  # one temperature: no fallback
    assert seen[-1] == 0


def test_bad_fallback_options_are_named(pipe):
    with pytest.raises(InvalidInputError, match="no_speech_threshold needs logprob_threshold"):
        transcribe(pipe, clip("low", 1.0), no_speech_threshold=0.5)
    with pytest.raises(InvalidInputError, match="temperature="):
        transcribe(pipe, clip("low", 1.0), temperatures=(0.0, -1.0))


def test_pipeline_takes_the_options(models, pipe):
    """`Pipeline(audio=...)`: a temperature tuple and the thresholds reach the transcription
    (the same segments as `generate` with them); they are refused for other requests."""
    audio = clip("sweep", 12.0)
    options = dict(logprob_threshold=-0.1, compression_ratio_threshold=1.5)
    want, _ = reference(models, audio, language="de", temperature=(0.0, 0.0),
                        condition_on_prev_tokens=True, **options)  # fmt: skip
    result = pipe(audio=(audio, RATE), language="de", temperature=(0.0, 0.0),
                  condition_on_prev_tokens=True, **options)  # fmt: skip
    assert_same_segments(ours(result), want)
    with pytest.raises(InvalidInputError, match="no_speech_threshold needs logprob_threshold"):
        pipe(audio=(audio, RATE), no_speech_threshold=0.6)
    with pytest.raises(InvalidInputError, match="temperature"):
        pipe(text="hello", temperature=(0.0, 0.5))
    with pytest.raises(InvalidInputError, match="word_timestamps"):
        pipe(text="hello", word_timestamps=True)
