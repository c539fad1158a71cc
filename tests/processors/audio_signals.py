"""Real audio made offline for the audio tests: tones, chirps, noise and a speech-like signal
(a glottal pulse train through formant resonators), encoded to every container we decode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine."""
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chirp(seconds: float, rate: int, f0: float = 100.0, f1: float = 6000.0) -> np.ndarray:
    """A float32 linear sweep from f0 to f1 Hz."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (0.4 * np.sin(phase)).astype(np.float32)


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Float32 Gaussian noise, std 0.1."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(
        np.float32
    )


def vowels(seconds: float, rate: int = 16_000) -> np.ndarray:
    """Speech-like audio: a 120 Hz pulse train (pitch gliding) through two formant filters that
    move between /a/, /i/ and /u/ every 0.3 s, with syllable-rate amplitude envelopes."""
    import torchaudio.functional as AF

    n = int(seconds * rate)
    t = np.arange(n) / rate
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    pulses = (np.diff(np.floor(np.cumsum(pitch) / rate), prepend=0) > 0).astype(np.float32)
    signal = torch.from_numpy(pulses)
    formants = [(730, 1090), (270, 2290), (300, 870)]  # /a/, /i/, /u/
    pieces = []
    step = int(0.3 * rate)
    for i, start in enumerate(range(0, n, step)):
        f1, f2 = formants[i % 3]
        piece = signal[start : start + step]
        for formant in (f1, f2):
            piece = AF.bandpass_biquad(piece, rate, formant, Q=5.0)
        envelope = np.sin(np.pi * np.arange(piece.shape[0]) / step) ** 2
        pieces.append(piece.numpy() * envelope)
    out = np.concatenate(pieces)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """`samples [frames]` or `[frames, channels]` float32 -> encoded bytes: wav (PCM 16),
    flac, ogg (Vorbis), mp3 (soundfile / libsndfile) or m4a (AAC, PyAV / FFmpeg)."""
    if fmt == "m4a":
        return _encode_m4a(samples, rate)
    import soundfile

    formats = {
        "wav": ("WAV", "PCM_16"),
        "flac": ("FLAC", "PCM_16"),
        "ogg": ("OGG", "VORBIS"),
        "mp3": ("MP3", "MPEG_LAYER_III"),
    }
    buffer = io.BytesIO()
    container, subtype = formats[fmt]
    soundfile.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _encode_m4a(samples: np.ndarray, rate: int) -> bytes:
    import av

    samples = samples if samples.ndim == 2 else samples[:, None]
    layout = "mono" if samples.shape[1] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout=layout)
        planar = np.ascontiguousarray(samples.T.astype(np.float32))  # [channels, frames]
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def long_silence_flac(path: Path, hours: float = 2.0, rate: int = 8000) -> Path:
    """A real FLAC file of `hours` of silence (~180 KB for 2 h), written in one-minute blocks."""
    import soundfile

    minute = np.zeros(rate * 60, dtype=np.int16)
    with soundfile.SoundFile(path, "w", samplerate=rate, channels=1, format="FLAC") as out:
        for _ in range(int(hours * 60)):
            out.write(minute)
    return path


def peak_hz(samples: np.ndarray | torch.Tensor, rate: int) -> float:
    """Frequency of the spectrum's highest peak."""
    samples = np.asarray(samples, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))
