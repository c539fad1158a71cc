"""Whisper's transcript pieces: `Segment` and `Transcript` (OpenAI's verbose_json shapes),
how one window's output splits into segments (`split_window`, transformers'
`_retrieve_segment`), and the two compression ratios: OpenAI's of the text (reported as a
segment's `compression_ratio`) and transformers' of the token ids (what
`compression_ratio_threshold` is checked against, `_retrieve_compression_ratio`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

TIME_PRECISION = 0.02  # seconds per timestamp token step (`<|0.02|>`)
FRAMES_PER_STEP = 2  # mel frames per timestamp step (two frames per encoder row)


@dataclass
class Word:
    """One word of a segment with its start and end in seconds (word timestamps)."""

    word: str
    start: float
    end: float

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start": self.start, "end": self.end}


@dataclass
class Segment:
    """A timed piece of the transcript, as OpenAI's verbose_json shapes it."""

    id: int
    seek: int
    """The first mel frame (10 ms each) of the window it was decoded from."""
    start: float
    end: float
    text: str
    tokens: list[int]
    """Its tokens, timestamps included (transformers' segment `tokens`)."""
    temperature: float
    avg_logprob: float | None = None
    """The window's mean chosen-token logprob, end-of-text included, of the distribution after
    the logit rules (suppressed tokens, timestamp rules), before temperature: transformers'
    `_retrieve_avg_logprobs` (`details=True` or a `logprob_threshold`)."""
    compression_ratio: float = 0.0
    """The window's text bytes over their zlib-compressed size (OpenAI's)."""
    no_speech_prob: float | None = None
    """P(`<|nospeech|>`) after `<|startoftranscript|>` in its window (`details=True`)."""
    token_timestamps: list[float] | None = None
    """Each of `tokens`' time in seconds (cross-attention DTW; `word_timestamps=True`)."""
    words: list[Word] | None = None
    """Its words with their times (`word_timestamps=True`)."""

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's segment fields (words and token times are the transcript's, not here)."""
        skip = ("token_timestamps", "words")
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}


@dataclass
class Transcript:
    """A finished clip: its text, language, duration and segments, and the engine's tokens."""

    text: str
    language: str | None
    duration: float
    segments: list[Segment]
    token_ids: list[int] = field(default_factory=list)
    """Every window's generated tokens, in order, as the engine returned them."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    """The last window's."""
    timestamps: bool = False
    """Whether it was decoded with timestamps (asked for, or a clip longer than a window)."""


def split_window(
    tokens: list[int], timestamp_begin: int, window_frames: int
) -> tuple[list[tuple[float, float, list[int]]], int]:
    """Split one window's output (end-of-text removed) at its timestamp pairs: ([(start, end,
    tokens)] in seconds from the window's start, frames to advance `seek`), as transformers'
    `_retrieve_segment` does."""
    is_timestamp = [t >= timestamp_begin for t in tokens]
    single_ending = is_timestamp[-2:] == [False, True]
    pair_ends = [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
    if not pair_ends:  # the whole output is one segment, to its last timestamp or the end
        end = int(window_frames / FRAMES_PER_STEP)
        stamps = [t for t in tokens if t >= timestamp_begin]
        if stamps and stamps[-1] != timestamp_begin:
            end = stamps[-1] - timestamp_begin
        return [(0.0, end * TIME_PRECISION, list(tokens))], window_frames
    slices = list(pair_ends)
    if single_ending:
        slices.append(len(tokens))
    else:
        slices[-1] += 1  # the last complete segment keeps both timestamps of its pair
    segments, last = [], 0
    for k, cut in enumerate(slices):
        piece = tokens[last:cut]
        end_at = -1 if k < len(slices) - 1 or single_ending else -2
        start = (piece[0] - timestamp_begin) * TIME_PRECISION
        segments.append((start, (piece[end_at] - timestamp_begin) * TIME_PRECISION, piece))
        last = cut
    if single_ending:  # no speech after the last timestamp: the whole window is done
        return segments, window_frames
    # the text after the last pair is cut mid-speech: decode it again from its start
    return segments, (tokens[last - 2] - timestamp_begin) * FRAMES_PER_STEP


def compression_ratio(text: str) -> float:
    """OpenAI's `compression_ratio`: UTF-8 bytes over their zlib-compressed size."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def token_compression_ratio(tokens: list[int], vocab_size: int) -> float:
    """transformers' `_retrieve_compression_ratio`: the token ids as little-endian bytes
    (`log2(vocab) / 8 + 1` each) over their zlib-compressed size."""
    width = int(math.log2(vocab_size) / 8) + 1
    data = b"".join(t.to_bytes(width, "little") for t in tokens)
    return len(data) / len(zlib.compress(data))
