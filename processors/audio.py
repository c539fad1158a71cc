"""Load one audio clip from whatever a user hands us: bounded, mono, at the model's rate.

Sources: a file path (`str`/`Path`, `file://`), raw bytes, a `data:` URL, an `http(s)://` URL
(only with `allow_http=True`), a `(array, sampling_rate)` pair, or transformers' dict
`{"array" | "raw": array, "sampling_rate": rate}`. A bare array is refused: its rate would be a
guess. Arrays are `[num_samples]` or 2-D with channels on the shorter axis; int16 / int32 /
uint8 PCM is scaled to [-1, 1] as soundfile scales it.

Encoded audio is decoded by its content, never its file name (a WAV named `.mp3` decodes as
WAV): libsndfile through `soundfile` (WAV, FLAC, OGG Vorbis/Opus, MP3), else FFmpeg through
PyAV (M4A/AAC and everything else FFmpeg reads), else `torchaudio.load` where torchcodec is
installed (torchaudio >= 2.9 decodes only through torchcodec). The duration is checked from
the header before any sample is decoded, and again as samples arrive (a header may lie).

Channels are averaged to mono (as transformers' Phi-4-MM extractor and FFmpeg's `-ac 1` do),
then the clip is resampled with `torchaudio.functional.resample` (windowed sinc, its defaults:
what transformers' speech-recognition pipeline uses).
"""

from __future__ import annotations

import dataclasses
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal.processors.input_cache import ProcessedInputCache, raw_media_key
from polymodal.processors.media import media_error, read_source_bytes

DEFAULT_MAX_AUDIO_SECONDS = 3600.0  # one hour; a longer clip is refused from its header
DEFAULT_MAX_AUDIO_BYTES = 1 << 30  # encoded size (1 GiB: an hour of 48 kHz stereo WAV fits)
MAX_SOURCE_RATE = 384_000  # Hz; above it a header is taken to be corrupt
BLOCK_FRAMES = 1 << 16  # frames decoded per block (downmixed as they arrive)

# leading bytes -> what the data looks like (for the error when nothing decodes it)
_MAGIC = [
    (b"RIFF", "WAV"),
    (b"fLaC", "FLAC"),
    (b"OggS", "OGG"),
    (b"ID3", "MP3"),
    (b"\xff\xfb", "MP3"),
    (b"\xff\xf3", "MP3"),
    (b"\xff\xf2", "MP3"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
]


@dataclass
class Audio:
    """A decoded clip: mono float32 `waveform [num_samples]` at `sampling_rate`."""

    waveform: torch.Tensor
    sampling_rate: int
    source_rate: int  # the rate it was decoded at (or given at)
    source_channels: int

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_samples / self.sampling_rate

    @property
    def data(self) -> dict[str, torch.Tensor]:
        """Its tensors (what the processed-input cache sizes)."""
        return {"waveform": self.waveform}

    def copy(self) -> Audio:
        """A copy sharing the waveform (read-only), as the processed-input cache hands out."""
        return dataclasses.replace(self)


def sniff_format(head: bytes) -> str | None:
    """What the leading bytes of `head` look like ("WAV", "M4A", "a PNG image", ...) or None."""
    if head[4:8] == b"ftyp":
        return "M4A/MP4"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def _too_long(seconds: float, max_seconds: float) -> ValueError:
    hours = f" ({seconds / 3600:.1f} h)" if seconds >= 3600 else ""
    return ValueError(
        f"duration {seconds:.1f} s{hours} exceeds the limit of {max_seconds:g} s "
        "(max_audio_seconds)"
    )


class _Bounded:
    """Collects decoded blocks `[frames, channels]`, downmixed, and stops past the limit."""

    def __init__(self, rate: int, channels: int, max_seconds: float):
        if not 0 < rate <= MAX_SOURCE_RATE:
            raise ValueError(f"sampling rate {rate} Hz in the header is out of range")
        if channels < 1:
            raise ValueError(f"{channels} channels in the header")
        self.rate, self.channels, self.max_seconds = rate, channels, max_seconds
        self.max_frames = int(max_seconds * rate)
        self.blocks: list[np.ndarray] = []
        self.frames = 0

    def add(self, block: np.ndarray) -> None:
        # block: float32 [frames, channels] -> mono [frames]
        self.frames += block.shape[0]
        if self.frames > self.max_frames:
            raise _too_long(self.frames / self.rate, self.max_seconds)
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        self.blocks.append(mono)

    def waveform(self) -> torch.Tensor:
        if not self.frames:
            raise ValueError("no audio samples (0-length clip)")
        return torch.from_numpy(np.concatenate(self.blocks).astype(np.float32, copy=False))


def _decode_soundfile(data: bytes | Path, max_seconds: float) -> tuple[torch.Tensor, int, int]:
    import soundfile

    handle = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with soundfile.SoundFile(handle) as clip:
        sink = _Bounded(clip.samplerate, clip.channels, max_seconds)
        if clip.frames > sink.max_frames:  # the header's length, before decoding
            raise _too_long(clip.frames / clip.samplerate, max_seconds)
        for block in clip.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True):
            sink.add(block)
        return sink.waveform(), sink.rate, sink.channels


def _decode_av(data: bytes | Path, max_seconds: float) -> tuple[torch.Tensor, int, int]:
    import av

    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        sink = _Bounded(rate, channels, max_seconds)
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
            if seconds > max_seconds:
                raise _too_long(seconds, max_seconds)
        # planar float32 in the stream's own layout and rate: [channels, frames] per frame
        to_float = av.AudioResampler(format="fltp")
        for frame in container.decode(stream):
            for converted in to_float.resample(frame):
                sink.add(converted.to_ndarray().T)
        for converted in to_float.resample(None):
            sink.add(converted.to_ndarray().T)
        return sink.waveform(), sink.rate, sink.channels


def _decode_torchaudio(data: bytes | Path, max_seconds: float) -> tuple[torch.Tensor, int, int]:
    import torchaudio

    waveform, rate = torchaudio.load(io.BytesIO(data) if isinstance(data, bytes) else str(data))
    sink = _Bounded(int(rate), int(waveform.shape[0]), max_seconds)
    sink.add(waveform.T.numpy().astype(np.float32, copy=False))  # [frames, channels]
    return sink.waveform(), sink.rate, sink.channels


def _backends() -> list:
    """The decoders installed, in the order they are tried."""
    import importlib.util

    found = []
    if importlib.util.find_spec("soundfile") is not None:
        found.append(_decode_soundfile)
    if importlib.util.find_spec("av") is not None:
        found.append(_decode_av)
    if importlib.util.find_spec("torchcodec") is not None:
        found.append(_decode_torchaudio)
    return found


def decode_audio(data: bytes | Path, max_seconds: float) -> tuple[torch.Tensor, int, int]:
    """Encoded audio -> (mono float32 waveform, its rate, source channels); raises ValueError.

    A duration limit hit by one backend is final (another would read the same header)."""
    backends = _backends()
    if not backends:
        raise ValueError("no audio decoder installed: pip install 'polymodal[audio]'")
    errors = []
    for backend in backends:
        try:
            return backend(data, max_seconds)
        except ValueError as exc:
            if "exceeds the limit" in str(exc) or "0-length" in str(exc):
                raise
            errors.append(str(exc))
        except Exception as exc:  # decoders raise their own types on bad data
            errors.append(str(exc))
    if isinstance(data, Path):
        with open(data, "rb") as handle:
            head = handle.read(16)
    else:
        head = data[:16]
    kind = sniff_format(head)
    looks = f"the data looks like {kind}" if kind else "not a recognised audio format"
    # the decoder's words without its errno and object reprs
    detail = re.sub(r"\[Errno -?\d+\] |: '<none>'|<_io\.BytesIO object at \w+>", "", errors[-1])
    raise ValueError(f"cannot decode audio ({looks}; {detail[:200]})")


def _pcm_to_float(array: np.ndarray) -> np.ndarray:
    """PCM of any common dtype -> float32 in [-1, 1] (the scaling soundfile applies)."""
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(array.dtype, np.signedinteger):
        return (array / float(np.iinfo(array.dtype).max + 1)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise ValueError(f"audio arrays must be float or integer PCM, got dtype {array.dtype}")


def audio_from_array(array: Any, rate: Any, max_seconds: float) -> tuple[torch.Tensor, int, int]:
    """`[num_samples]` or 2-D (channels on the shorter axis) -> (mono waveform, rate, channels)."""
    if isinstance(rate, (float, np.floating)) and float(rate).is_integer():
        rate = int(rate)  # 16000.0 (vLLM's pairs take a float rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"sampling rate must be a positive whole number of Hz, got {rate!r}")
    rate = int(rate)
    if rate > MAX_SOURCE_RATE:
        raise ValueError(f"sampling rate {rate} Hz is above the limit of {MAX_SOURCE_RATE}")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        array = array if array.shape[1] <= array.shape[0] else array.T  # [frames, channels]
    else:
        raise ValueError(f"audio arrays must be 1-D or 2-D, got shape {array.shape}")
    array = _pcm_to_float(array)
    if not np.isfinite(array).all():
        raise ValueError("audio array holds NaN or infinite samples")
    sink = _Bounded(rate, array.shape[1], max_seconds)
    sink.add(array)
    return sink.waveform(), rate, array.shape[1]


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Windowed-sinc resampling (torchaudio's defaults); a no-op at equal rates."""
    if orig_rate == new_rate:
        return waveform
    import torchaudio.functional

    return torchaudio.functional.resample(waveform, orig_rate, new_rate)


def _split_source(source: Any) -> tuple[Any, Any] | None:
    """(array, rate) of an in-memory source, or None for an encoded one."""
    if isinstance(source, dict):
        array = source.get("array", source.get("raw"))
        if array is None or "sampling_rate" not in source:
            raise ValueError(
                "an audio dict needs 'array' (or 'raw') and 'sampling_rate'; "
                f"got keys {sorted(source)}"
            )
        return array, source["sampling_rate"]
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ValueError("audio as a tuple must be (array, sampling_rate)")
        return source[0], source[1]
    if isinstance(source, (np.ndarray, torch.Tensor)):
        raise ValueError("a bare array has no sampling rate: pass (array, sampling_rate)")
    return None


def load_audio(
    source: Any,
    *,
    index: int = 0,
    sampling_rate: int = 16_000,
    max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    max_bytes: int = DEFAULT_MAX_AUDIO_BYTES,
    allow_http: bool = False,
    cache: ProcessedInputCache | None = None,
) -> Audio:
    """Decode `source` to mono float32 at `sampling_rate`; user errors raise `MediaError`
    naming the item ("audio 2 ('a.wav'): ...").

    `index` (0-based) is the item's position among the request's audio clips; `max_seconds`
    bounds the duration (checked from the header before decoding, and while decoding);
    `max_bytes` bounds the encoded size. With a processed-input `cache`, encoded sources (a
    path, bytes, a data: URL) are keyed by BLAKE3 of their bytes, the rate and the limits: the
    same clip again skips decoding and resampling.
    """
    raw = raw_media_key(source, allow_http) if cache is not None else None
    key = ("audio", raw, sampling_rate, max_seconds, max_bytes)
    if raw is not None and (hit := cache.get(key)) is not None:
        return hit
    audio = _load_audio(source, index, sampling_rate, max_seconds, max_bytes, allow_http)
    if raw is not None:
        cache.put(key, audio)
    return audio


def _load_audio(source, index, sampling_rate, max_seconds, max_bytes, allow_http) -> Audio:
    """`load_audio` without the cache."""
    try:
        pair = _split_source(source)
        if pair is not None:
            waveform, rate, channels = audio_from_array(pair[0], pair[1], max_seconds)
        elif isinstance(source, (str, Path, bytes, bytearray, memoryview)):
            data = read_source_bytes(source, allow_http=allow_http)
            size = len(data) if isinstance(data, bytes) else data.stat().st_size
            if size == 0:
                raise ValueError("cannot decode: empty data (0 bytes)")
            if size > max_bytes:
                raise ValueError(f"{size} bytes exceeds the limit of {max_bytes} (max_audio_bytes)")
            waveform, rate, channels = decode_audio(data, max_seconds)
        else:
            raise ValueError(
                f"unsupported audio type {type(source).__name__}; pass a path, bytes, data: URL, "
                "(array, sampling_rate) or {'array': ..., 'sampling_rate': ...}"
            )
        waveform = resample(waveform, rate, sampling_rate)
    except ValueError as exc:
        raise media_error("audio", index, source, str(exc)) from None
    return Audio(waveform.contiguous(), sampling_rate, rate, channels)
