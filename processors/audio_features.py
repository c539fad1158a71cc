"""Log-mel features of a mono waveform, equal to transformers' feature extractors', and the
content hash of an audio item.

- `WhisperFeatures`: `WhisperFeatureExtractor` (Slaney mel filters, periodic Hann window,
  centred STFT with reflect padding, the last frame dropped, log10, clamped to 8 below the
  clip's maximum, `(x + 4) / 4`). Output `[n_mels, frames]`; 30 s -> 3000 frames.
- `Phi4MMFeatures`: `Phi4MultimodalFeatureExtractor` (Kaldi-scale filters triangular in mel
  space, 400-sample frames every 160, per-frame pre-emphasis 0.97 scaled by 32768, symmetric
  Hamming window, 512-point FFT in float64, power, natural log clamped at 1). Output
  `[frames, n_mels]`, frames = `(samples - 400) // 160 + 1`.

Both are plain torch ops, so they run wherever the waveform is (host or device); float32
results match the reference within 1e-4 (tests/processors/test_audio_features.py).
The filter banks are computed here (float64 numpy), and tested equal to transformers'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import blake3
import numpy as np
import torch


def hertz_to_mel(freq: np.ndarray, scale: str) -> np.ndarray:
    """Hz -> mel on the "slaney" (linear below 1 kHz, log above), "htk" or "kaldi" scale."""
    freq = np.asarray(freq, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    if scale == "kaldi":
        return 1127.0 * np.log(1.0 + freq / 700.0)
    # slaney: 3 mels per 200 Hz up to 1 kHz (15 mels), then 27 mels per factor 6.4
    mels = 3.0 * freq / 200.0
    log_step = 27.0 / np.log(6.4)
    above = freq >= 1000.0
    return np.where(above, 15.0 + np.log(np.maximum(freq, 1e-30) / 1000.0) * log_step, mels)


def mel_to_hertz(mels: np.ndarray, scale: str) -> np.ndarray:
    """The inverse of `hertz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if scale == "kaldi":
        return 700.0 * (np.exp(mels / 1127.0) - 1.0)
    freq = 200.0 * mels / 3.0
    above = mels >= 15.0
    return np.where(above, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filters(
    num_bins: int,
    num_mels: int,
    min_hz: float,
    max_hz: float,
    sampling_rate: int,
    *,
    scale: str = "slaney",
    slaney_norm: bool = False,
    triangles_in_mel: bool = False,
) -> np.ndarray:
    """Triangular mel filter bank `[num_bins, num_mels]` (float64).

    Edges are `num_mels + 2` points evenly spaced in mel between `min_hz` and `max_hz`. The
    triangles are linear in Hz over the bin frequencies `linspace(0, sr // 2, num_bins)`, or,
    with `triangles_in_mel`, linear in mel over the bins' mel values (Kaldi's way). Slaney
    normalisation scales each filter by 2 / (its width in Hz), for constant energy.
    """
    mel_edges = np.linspace(hertz_to_mel(min_hz, scale), hertz_to_mel(max_hz, scale), num_mels + 2)
    if triangles_in_mel:
        bin_width = sampling_rate / ((num_bins - 1) * 2)
        bins, edges = hertz_to_mel(bin_width * np.arange(num_bins), scale), mel_edges
    else:
        bins = np.linspace(0, sampling_rate // 2, num_bins)
        edges = mel_to_hertz(mel_edges, scale)
    widths = np.diff(edges)  # [num_mels + 1]
    offsets = edges[None, :] - bins[:, None]  # [num_bins, num_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))  # [num_bins, num_mels]
    if slaney_norm:
        bank = bank * (2.0 / (edges[2 : num_mels + 2] - edges[:num_mels]))[None, :]
    return bank


@lru_cache(maxsize=16)
def _filters_on(key: tuple, device: str) -> torch.Tensor:
    """A config's float32 filter bank on `device`, made once."""
    args, kwargs = key
    bank = mel_filters(*args, **dict(kwargs))
    return torch.from_numpy(bank).to(device=device, dtype=torch.float32)


def _from_config(cls, config: dict[str, Any]):
    """Build a features dataclass from a preprocessor_config.json dict (unknown keys ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


@dataclass(frozen=True)
class WhisperFeatures:
    """Whisper's log-mel spectrogram (see the module docstring); fields as in
    preprocessor_config.json. `__call__(waveform)` -> float32 `[feature_size, frames]`."""

    feature_size: int = 80
    sampling_rate: int = 16_000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    padding_value: float = 0.0
    dither: float = 0.0

    from_config = classmethod(_from_config)

    def __post_init__(self):
        if self.dither != 0.0:
            raise ValueError("dither != 0 makes features random; polymodal supports dither=0")

    @property
    def n_samples(self) -> int:
        """Samples of one window (30 s at 16 kHz: 480000)."""
        return self.chunk_length * self.sampling_rate

    @property
    def frames_per_window(self) -> int:
        return self.n_samples // self.hop_length

    def filters(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 `[n_fft // 2 + 1, feature_size]`."""
        key = ((1 + self.n_fft // 2, self.feature_size, 0.0, 8000.0, self.sampling_rate),
               (("scale", "slaney"), ("slaney_norm", True)))  # fmt: skip
        return _filters_on(key, str(device))

    def __call__(self, waveform: torch.Tensor, pad_to: int | None | str = "window") -> torch.Tensor:
        """`waveform [samples]` (float, the model's rate) -> `[feature_size, frames]` float32.

        `pad_to="window"` pads with `padding_value` or truncates to one window (the reference's
        default: 3000 frames); an int pads/truncates to that many samples; None keeps the
        clip's own length (`samples // hop_length` frames).
        """
        waveform = waveform.to(torch.float32).reshape(-1)
        target = self.n_samples if pad_to == "window" else pad_to
        if target is not None:
            waveform = waveform[:target]
            if waveform.shape[0] < target:
                pad = (0, target - waveform.shape[0])
                waveform = torch.nn.functional.pad(waveform, pad, value=self.padding_value)
        if waveform.shape[0] <= self.n_fft // 2:
            raise ValueError(
                f"{waveform.shape[0]} samples is too short for a {self.n_fft}-point STFT"
            )
        window = torch.hann_window(self.n_fft, device=waveform.device)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()  # [bins, frames]; last frame dropped
        mel = self.filters(waveform.device).T @ power  # [feature_size, frames]
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


@dataclass(frozen=True)
class Phi4MMFeatures:
    """Phi-4-multimodal's log-mel features (see the module docstring); fields as in its
    preprocessor_config.json. `__call__(waveform)` -> float32 `[frames, feature_size]`."""

    feature_size: int = 80
    sampling_rate: int = 16_000
    hop_length: int = 160
    n_fft: int = 512
    win_length: int = 400
    preemphasis: float = 0.97
    audio_compression_rate: int = 8
    audio_downsample_rate: int = 1
    audio_feat_stride: int = 1
    mel_min_frequency: float = 0.0
    mel_max_frequency: float = 7690.0

    from_config = classmethod(_from_config)

    def filters(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 `[n_fft // 2 + 1, feature_size]`."""
        key = ((self.n_fft // 2 + 1, self.feature_size, float(self.mel_min_frequency),
                float(self.mel_max_frequency), self.sampling_rate),
               (("scale", "kaldi"), ("triangles_in_mel", True)))  # fmt: skip
        return _filters_on(key, str(device))

    def num_frames(self, num_samples: int) -> int:
        """Feature frames of a clip (`audio_feat_stride` counted, as the reference does)."""
        return ((num_samples - self.win_length) // self.hop_length + 1) * self.audio_feat_stride

    def num_embeds(self, num_samples: int) -> int:
        """Audio embeddings (placeholder slots) of a clip: frames / compression, then / the
        projector's downsampling, each rounded up (the reference's `audio_embed_sizes`)."""
        frames = self.num_frames(num_samples)
        compressed = math.ceil(frames / self.audio_compression_rate)
        return math.ceil(compressed / self.audio_downsample_rate)

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """`waveform [samples]` (float, the model's rate) -> `[frames, feature_size]` float32."""
        waveform = waveform.to(torch.float32).reshape(-1)
        if waveform.shape[0] < self.win_length:
            raise ValueError(
                f"{waveform.shape[0]} samples is shorter than one {self.win_length}-sample "
                f"frame ({1000 * self.win_length / self.sampling_rate:g} ms)"
            )
        frames = waveform.unfold(0, self.win_length, self.hop_length)  # [frames, win]
        previous = torch.roll(frames, 1, dims=-1)
        previous[:, 0] = previous[:, 1]  # the first sample's "previous" is the second
        frames = (frames - self.preemphasis * previous) * 32768
        window = torch.hamming_window(
            self.win_length, periodic=False, device=frames.device, dtype=torch.float64
        )
        spectrum = torch.fft.rfft(window * frames, n=self.n_fft, dim=-1)  # float64 complex
        power = spectrum.to(torch.complex64).abs() ** 2  # [frames, bins] float32
        return torch.log(torch.clamp(power @ self.filters(frames.device), min=1.0))


def audio_content_hash(waveform: torch.Tensor, features: Any) -> str:
    """BLAKE3 (hex) over "audio", the feature config and the model-rate mono waveform's bytes.

    The waveform and the config determine the features exactly, so the key is the encoder's
    input without the features having been computed (they may be made on the device later);
    two extractors (or two rates) never share a key.
    """
    digest = blake3.blake3()
    config = f"audio|{type(features).__name__}|{sorted(asdict(features).items())}|"
    digest.update(config.encode())
    samples = waveform.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    digest.update(f"{samples.shape[0]}|".encode())
    digest.update(samples.view(torch.uint8).numpy())
    return digest.hexdigest()
