"""Log-mel features against transformers' extractors (the reference) on real offline audio.

Stated tolerance: float32 log-mel features agree with `WhisperFeatureExtractor` and
`Phi4MultimodalFeatureExtractor` to max |diff| <= 1e-4 (TOL); on this machine they agree
exactly (same torch ops; the filter banks, computed here independently, agree to ~1e-9).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.processors.audio import load_audio
from polymodal.processors.audio_features import Phi4MMFeatures, WhisperFeatures, mel_filters
from tests.processors.audio_signals import chirp, encode, noise, tone, vowels

pytest.importorskip("torchaudio")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # float32 log-mel, max abs diff
RATE = 16_000


def _signals() -> dict[str, np.ndarray]:
    return {
        "tone": tone(440.0, 2.0, RATE),
        "chirp": chirp(3.0, RATE),
        "noise": noise(1.0, RATE),
        "speech_like": vowels(4.0),
        "tone_plus_noise": tone(300.0, 1.3, RATE) + noise(1.3, RATE, seed=1),
        "silence": np.zeros(RATE // 2, np.float32),
    }


@pytest.fixture(scope="module")
def signals():
    return _signals()


def _max_diff(ours: torch.Tensor, reference) -> float:
    reference = torch.as_tensor(np.asarray(reference), dtype=torch.float32)
    assert tuple(ours.shape) == tuple(reference.shape)
    return float((ours - reference).abs().max())


@pytest.mark.parametrize("num_mels", [80, 128])  # whisper-small .. large-v2; large-v3
def test_whisper_filters_and_features(signals, num_mels):
    reference = transformers.WhisperFeatureExtractor(feature_size=num_mels)
    ours = WhisperFeatures(feature_size=num_mels)
    ours_bank = mel_filters(201, num_mels, 0.0, 8000.0, RATE, slaney_norm=True)
    assert np.abs(ours_bank - reference.mel_filters).max() < 1e-8
    for name, clip in signals.items():
        padded = reference(clip, sampling_rate=RATE, return_tensors="np").input_features[0]
        features = ours(torch.from_numpy(clip))
        assert features.shape == (num_mels, 3000) and features.dtype == torch.float32
        assert _max_diff(features, padded) <= TOL, name
        # the clip's own length (no padding): what long-form chunking uses
        unpadded = reference(
            clip, sampling_rate=RATE, return_tensors="np", padding="do_not_pad", truncation=False
        ).input_features[0]
        assert _max_diff(ours(torch.from_numpy(clip), pad_to=None), unpadded) <= TOL, name


def test_whisper_truncates_past_30_seconds():
    clip = np.concatenate([vowels(20.0), chirp(15.0, RATE)])  # 35 s
    reference = transformers.WhisperFeatureExtractor()
    expected = reference(clip, sampling_rate=RATE, return_tensors="np").input_features[0]
    assert _max_diff(WhisperFeatures()(torch.from_numpy(clip)), expected) <= TOL


def test_whisper_config_from_preprocessor_json():
    config = transformers.WhisperFeatureExtractor(feature_size=128).to_dict()
    parsed = WhisperFeatures.from_config(config)
    assert parsed == WhisperFeatures(feature_size=128)
    assert (parsed.n_samples, parsed.frames_per_window) == (480_000, 3000)
    with pytest.raises(ValueError, match="dither"):
        WhisperFeatures(dither=1e-4)


def test_phi4mm_filters_and_features(signals):
    reference = transformers.Phi4MultimodalFeatureExtractor()
    ours = Phi4MMFeatures.from_config(reference.to_dict())
    assert ours == Phi4MMFeatures()
    bank = mel_filters(257, 80, 0.0, 7690.0, RATE, scale="kaldi", triangles_in_mel=True)
    assert np.abs(bank - reference.mel_filters).max() < 1e-8
    for name, clip in signals.items():
        expected = reference(clip, sampling_rate=RATE, return_tensors="pt")
        features = ours(torch.from_numpy(clip))
        assert features.shape == (ours.num_frames(len(clip)), 80)
        assert _max_diff(features, expected.audio_input_features[0]) <= TOL, name
        assert ours.num_embeds(len(clip)) == int(expected.audio_embed_sizes[0])


def test_phi4mm_batched_reference_rows_equal_each_clip_alone(signals):
    # the reference pads a batch and masks frames past each clip; its real rows are ours
    clips = [signals["tone"], signals["speech_like"], signals["noise"]]
    reference = transformers.Phi4MultimodalFeatureExtractor()
    batch = reference(clips, sampling_rate=RATE, return_tensors="pt")
    ours = Phi4MMFeatures()
    for row, clip in enumerate(clips):
        features = ours(torch.from_numpy(clip))
        assert _max_diff(features, batch.audio_input_features[row, : features.shape[0]]) <= TOL


def test_too_short_for_one_frame():
    with pytest.raises(ValueError, match="shorter than one 400-sample frame \\(25 ms\\)"):
        Phi4MMFeatures()(torch.zeros(399))
    with pytest.raises(ValueError, match="too short"):
        WhisperFeatures()(torch.zeros(100), pad_to=None)


@pytest.mark.parametrize("rate, channels", [(8000, 1), (48000, 2), (44100, 2), (22050, 1)])
def test_odd_files_give_reference_features(rate, channels):
    # decode + downmix + resample (ours), then both extractors on the 16 kHz clip
    seconds = 1.5
    mono = vowels(seconds, rate) if rate >= 16000 else tone(1000.0, seconds, rate)
    stereo = np.stack([mono, chirp(seconds, rate, f1=rate / 2.5)], axis=1)
    audio = load_audio(encode(stereo if channels == 2 else mono, rate, "wav"))
    assert audio.sampling_rate == RATE and audio.num_samples == int(seconds * RATE)
    clip = audio.waveform.numpy()
    whisper = transformers.WhisperFeatureExtractor()
    expected = whisper(clip, sampling_rate=RATE, return_tensors="np").input_features[0]
    assert _max_diff(WhisperFeatures()(audio.waveform), expected) <= TOL
    phi = transformers.Phi4MultimodalFeatureExtractor()
    expected = phi(clip, sampling_rate=RATE, return_tensors="pt").audio_input_features[0]
    assert _max_diff(Phi4MMFeatures()(audio.waveform), expected) <= TOL
