"""Audio loading: every container, every source form, downmix, resample, bounds, clear errors.

Signals are made offline (tests/processors/audio_signals.py) and encoded with soundfile
(WAV/FLAC/OGG/MP3) and PyAV (M4A/AAC)."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch

from polymodal.llm_core.errors import MediaError
from polymodal.processors.audio import load_audio, resample
from polymodal.processors.audio_features import Phi4MMFeatures, WhisperFeatures, audio_content_hash
from tests.processors.audio_signals import chirp, encode, long_silence_flac, peak_hz, tone, vowels

pytest.importorskip("soundfile")
pytest.importorskip("av")
pytest.importorskip("torchaudio")

RATE = 16_000
INT16_STEP = 1 / 32768  # what PCM-16 quantisation may move a sample by


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_containers_decode_exactly(fmt, tmp_path):
    clip = chirp(1.5, RATE)
    path = tmp_path / f"chirp.{fmt}"
    path.write_bytes(encode(clip, RATE, fmt))
    audio = load_audio(path)
    assert (audio.sampling_rate, audio.source_rate, audio.source_channels) == (RATE, RATE, 1)
    assert audio.waveform.dtype == torch.float32 and audio.num_samples == len(clip)
    assert (audio.waveform - torch.from_numpy(clip)).abs().max() <= INT16_STEP
    assert audio.duration == pytest.approx(1.5)


@pytest.mark.parametrize("fmt", ["ogg", "mp3", "m4a"])
def test_lossy_containers_decode(fmt):
    # lossy codecs add priming / padding frames (AAC: up to 2048) and change sample values:
    # the length is right to within that and the tone is where it was
    clip = tone(440.0, 1.0, RATE)
    audio = load_audio(encode(clip, RATE, fmt))
    assert abs(audio.num_samples - len(clip)) <= 2048
    assert peak_hz(audio.waveform, RATE) == pytest.approx(440.0, abs=2.0)
    assert 0.3 < float(audio.waveform.abs().max()) < 0.7


def test_a_float_rate_that_is_whole_is_taken():
    """vLLM's `(waveform, sampling_rate)` pairs take a float rate: 16000.0 is 16000 Hz."""
    wave = tone(440.0, 0.25, RATE)
    as_int, as_float = load_audio((wave, RATE)), load_audio((wave, float(RATE)))
    assert as_float.source_rate == as_int.source_rate == RATE
    assert torch.equal(as_float.waveform, as_int.waveform)


def test_8khz_mono_is_resampled_to_16khz():
    clip = tone(1000.0, 1.0, 8000)
    audio = load_audio(encode(clip, 8000, "wav"))
    assert (audio.source_rate, audio.sampling_rate, audio.num_samples) == (8000, RATE, 16000)
    decoded = load_audio(encode(clip, 8000, "wav"), sampling_rate=8000).waveform
    # torchaudio's windowed sinc with its defaults: what transformers' ASR pipeline applies
    assert torch.equal(audio.waveform, resample(decoded, 8000, RATE))
    assert peak_hz(audio.waveform, RATE) == pytest.approx(1000.0, abs=2.0)


def test_48khz_stereo_is_downmixed_then_resampled():
    left, right = tone(440.0, 1.0, 48000), tone(1320.0, 1.0, 48000, amplitude=0.25)
    stereo = np.stack([left, right], axis=1)  # [frames, 2]
    audio = load_audio(encode(stereo, 48000, "wav"))
    assert (audio.source_channels, audio.source_rate, audio.num_samples) == (2, 48000, 16000)
    pcm = np.round(stereo * 32767).clip(-32768, 32767) / 32768  # what PCM-16 stores
    expected = resample(torch.from_numpy(pcm.mean(axis=1).astype(np.float32)), 48000, RATE)
    assert (audio.waveform - expected).abs().max() < 1e-4
    spectrum = np.abs(np.fft.rfft(audio.waveform.numpy()))
    assert spectrum[440] > 0.5 * spectrum.max() and spectrum[1320] > 0.2 * spectrum.max()
    # the same stereo clip as an array, either axis order
    for array in (stereo, stereo.T.copy(), torch.from_numpy(stereo.T.copy())):
        from_array = load_audio((array, 48000)).waveform
        assert torch.allclose(from_array, resample(torch.from_numpy(stereo.mean(1)), 48000, RATE))


def test_source_forms_agree(tmp_path):
    clip = vowels(1.0)
    data = encode(clip, RATE, "flac")
    path = tmp_path / "speech.flac"
    path.write_bytes(data)
    url = "data:audio/flac;base64," + base64.b64encode(data).decode()
    decoded = [
        load_audio(src).waveform
        for src in (path, str(path), f"file://{path}", data, bytearray(data), url)
    ]
    assert all(torch.equal(d, decoded[0]) for d in decoded)
    import soundfile

    pcm16, _ = soundfile.read(io.BytesIO(data), dtype="int16")  # int PCM: scaled as soundfile
    assert torch.equal(load_audio((pcm16, RATE)).waveform, decoded[0])
    assert torch.equal(load_audio({"array": pcm16, "sampling_rate": RATE}).waveform, decoded[0])
    assert torch.equal(load_audio({"raw": torch.from_numpy(clip), "sampling_rate": RATE}).waveform,
                       torch.from_numpy(clip))  # fmt: skip


def test_wrong_extension_decodes_by_content(tmp_path):
    clip = tone(440.0, 0.5, RATE)
    for fmt, wrong in (("wav", "mp3"), ("flac", "ogg"), ("m4a", "wav")):
        data = encode(clip, RATE, fmt)
        (tmp_path / f"right.{fmt}").write_bytes(data)
        (tmp_path / f"wrong.{wrong}").write_bytes(data)
        right = load_audio(tmp_path / f"right.{fmt}").waveform
        assert torch.equal(load_audio(tmp_path / f"wrong.{wrong}").waveform, right)
    png = tmp_path / "photo.wav"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(MediaError, match=r"audio 1 \('photo.wav'\).*looks like a PNG image"):
        load_audio(png)


def test_zero_length_clip(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(encode(np.zeros(0, np.float32), RATE, "wav"))  # a header, no samples
    with pytest.raises(MediaError, match=r"audio 1 \('empty.wav'\): no audio samples \(0-length"):
        load_audio(empty)
    (tmp_path / "nothing.wav").write_bytes(b"")
    with pytest.raises(MediaError, match=r"'nothing.wav'.*empty data \(0 bytes\)"):
        load_audio(tmp_path / "nothing.wav")
    with pytest.raises(MediaError, match=r"audio 3 .*0-length"):
        load_audio((np.zeros(0, np.float32), RATE), index=2)


def test_two_hour_header_is_refused_before_decoding(tmp_path):
    path = long_silence_flac(tmp_path / "two_hours.flac", hours=2.0)  # a real 2 h file
    start = time.perf_counter()
    with pytest.raises(MediaError, match=r"'two_hours.flac'.*7200.0 s \(2.0 h\) exceeds the limit"):
        load_audio(path)
    assert time.perf_counter() - start < 0.5  # from the header: nothing decoded
    with pytest.raises(MediaError, match=r"exceeds the limit of 60 s"):
        load_audio(path, max_seconds=60)


def test_lying_header_decodes_what_the_file_holds():
    # a WAV header claiming 2 hours over one second of samples: decoders clamp to the file
    import struct

    pcm = (tone(440.0, 1.0, RATE) * 32767).astype("<i2").tobytes()
    claimed = 2 * 3600 * RATE * 2
    header = b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16) + b"data"
    audio = load_audio(header + struct.pack("<I", claimed) + pcm)
    assert audio.num_samples == RATE


def test_limits_and_bad_input(tmp_path):
    data = encode(tone(440.0, 2.0, RATE), RATE, "wav")
    with pytest.raises(MediaError, match=r"audio 1 .*exceeds the limit of 1 s"):
        load_audio(data, max_seconds=1.0)
    with pytest.raises(MediaError, match=r"exceeds the limit of 1000 \(max_audio_bytes\)"):
        load_audio(data, max_bytes=1000)
    with pytest.raises(MediaError, match="looks like WAV"):
        load_audio(data[:30])  # cut inside the header
    flac = encode(tone(440.0, 2.0, RATE), RATE, "flac")
    with pytest.raises(MediaError, match="looks like FLAC"):
        load_audio(flac[:200])
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))
    with pytest.raises(MediaError, match="not a recognised audio format"):
        load_audio(garbage)
    with pytest.raises(MediaError, match="no such file"):
        load_audio(str(tmp_path / "missing.wav"))
    with pytest.raises(MediaError, match="no sampling rate: pass \\(array, sampling_rate\\)"):
        load_audio(np.zeros(100, np.float32))
    with pytest.raises(MediaError, match="positive whole number of Hz, got 0"):
        load_audio((np.zeros(100, np.float32), 0))
    with pytest.raises(MediaError, match="positive whole number of Hz, got 16000.5"):
        load_audio((np.zeros(100, np.float32), 16000.5))
    with pytest.raises(MediaError, match="NaN"):
        load_audio((np.full(100, np.nan, np.float32), RATE))
    with pytest.raises(MediaError, match="1-D or 2-D"):
        load_audio((np.zeros((2, 2, 100), np.float32), RATE))
    with pytest.raises(MediaError, match="'array' \\(or 'raw'\\) and 'sampling_rate'"):
        load_audio({"array": np.zeros(10)})
    with pytest.raises(MediaError, match="http\\(s\\) URLs are not fetched"):
        load_audio("https://example.com/a.wav")
    with pytest.raises(MediaError, match="unsupported audio type int"):
        load_audio(3)


def test_content_hash_keys_the_encoder_input():
    clip = vowels(1.0)
    whisper, phi = WhisperFeatures(), Phi4MMFeatures()
    import soundfile

    data = encode(clip, RATE, "wav")
    from_wav = load_audio(data).waveform
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    flac = io.BytesIO()
    soundfile.write(flac, samples, RATE, format="FLAC")  # the same PCM in another container
    key = audio_content_hash(from_wav, whisper)
    assert key == audio_content_hash(load_audio(flac.getvalue()).waveform, whisper)
    assert key == audio_content_hash(load_audio((samples, RATE)).waveform, whisper)
    assert key != audio_content_hash(from_wav, phi)  # another extractor, another input
    assert key != audio_content_hash(from_wav, WhisperFeatures(feature_size=128))
    changed = from_wav.clone()
    changed[100] += 1e-3
    assert key != audio_content_hash(changed, whisper)
    assert key != audio_content_hash(from_wav[:-1], whisper)
