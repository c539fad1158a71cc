"""One audio clip's way through Whisper, window by window, as transformers'
`WhisperForConditionalGeneration.generate` goes (its sequential long-form algorithm):

1. no language given (a multilingual checkpoint): one decoder step after
   `<|startoftranscript|>` over the first window, restricted to the language tokens
   (`detect_language`); the transcription then uses that language;
2. window after window: the log-mel features from `seek` (`max_source_positions * 2` frames,
   the last one padded with zero features), decoded from `[previous text]
   <|startoftranscript|> language task [<|notimestamps|>]`; the output is split into segments
   at each pair of timestamps, and `seek` moves to the last complete segment's end (to the
   window's end when the output ends on a single timestamp or has no pair).

A clip longer than one window decodes with timestamps (transformers turns them on there).
`condition_on_prev_tokens` is off (transformers' default): each window starts from the same
prompt; there is no temperature fallback (a window is decoded once, at the request's
temperature).

`Transcription` is the state of one clip and builds its engine requests; a driver (the SDK's
`polymodal.speech` for `LLM`, the audio routes for the server) runs them, many clips in one
batch, and feeds the outputs back. With `details=True` each window also gets the chosen
tokens' logprobs (`avg_logprob`) and a one-step request for `<|nospeech|>`'s probability after
`<|startoftranscript|>` (`no_speech_prob`, as OpenAI's whisper reads it).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.types import ProcessedPrompt

TIME_PRECISION = 0.02  # seconds per timestamp token step (`<|0.02|>`)
FRAMES_PER_STEP = 2  # mel frames per timestamp step (two frames per encoder row)
DETECT, WINDOW, NO_SPEECH = "detect", "window", "no_speech"


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
    """The window's mean chosen-token logprob (raw logits; `details=True`)."""
    compression_ratio: float = 0.0
    """The window's text bytes over their zlib-compressed size."""
    no_speech_prob: float | None = None
    """P(`<|nospeech|>`) after `<|startoftranscript|>` in its window (`details=True`)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


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


class Transcription:
    """One clip being transcribed; see the module docstring.

    `requests()` gives the next `(tag, ProcessedPrompt, SamplingParams)` to run together
    ([] when done); `add_output(tag, output)` takes each one's final `RequestOutput`;
    `result()` is the `Transcript` once `done`.
    """

    def __init__(
        self,
        processor: Any,
        features: torch.Tensor,
        duration: float,
        params: SamplingParams,
        *,
        language: str | None = None,
        task: str | None = None,
        timestamps: bool = False,
        previous_text: str | None = None,
        details: bool = False,
    ):
        self.processor = processor
        self.features = features  # [num_mel_bins, frames]
        self.duration = duration
        self.num_frames = features.shape[-1]
        self.timestamps = timestamps or self.num_frames > processor.num_frames
        self.task = task
        self.details = details
        processor.init_ids(None, task)  # a bad task fails here, before any request
        self.language_id = processor.language_id(language) if language is not None else None
        self.detect = self.language_id is None and processor.multilingual
        self.previous = processor.previous_ids(previous_text)
        update: dict[str, Any] = {}
        if self.timestamps:
            update["timestamp_rules"] = processor.timestamp_rules()
        if details:
            update["logprobs"] = 0
        if "max_tokens" not in params.model_fields_set:  # up to the context, as `generate`
            update["max_tokens"] = None
        self.params = params.model_copy(update=update)
        self.seek = 0
        self.segments: list[Segment] = []
        self.token_ids: list[int] = []
        self.usage = [0, 0]
        self.finish_reason: str | None = None
        self._waiting: dict[str, Any] = {}

    @classmethod
    def load(cls, processor: Any, audio: Any, params: SamplingParams, **options: Any):
        """A transcription of `audio` (anything `load_audio` takes), its features computed."""
        features, duration = processor.features(audio)
        return cls(processor, features, duration, params, **options)

    @property
    def done(self) -> bool:
        return self.seek >= self.num_frames

    @property
    def language(self) -> str | None:
        if self.language_id is None:
            return None
        return self.processor.language_code(self.language_id)

    def _window(self) -> torch.Tensor:
        """The features from `seek`: one window, zero-padded at the clip's end."""
        size = self.processor.num_frames
        window = self.features[:, self.seek : self.seek + size]
        if window.shape[-1] < size:
            window = torch.nn.functional.pad(window, (0, size - window.shape[-1]))
        return window

    def requests(self) -> list[tuple[str, ProcessedPrompt, SamplingParams]]:
        """The next requests (tagged `detect`, `window`, `no_speech`); [] when done or while
        the last batch's outputs are not all in."""
        if self.done or self._waiting:
            return []
        item = self.processor.window_item(self._window())
        sot = self.processor.sot

        def prompt(ids: list[int]) -> ProcessedPrompt:
            return ProcessedPrompt(ids, None, 0, [item])

        if self.detect and self.language_id is None:
            languages = sorted(int(v) for v in self.processor.lang_to_id.values())
            detect = SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=languages)
            batch = [(DETECT, prompt([sot]), detect)]
        else:
            init = self.processor.init_ids(
                self.language_id, self.task, self.timestamps, detected=self.detect
            )
            batch = [(WINDOW, prompt(self.previous + init), self.params)]
            if self.details:
                no_speech = SamplingParams(
                    temperature=0.0, max_tokens=1, logprobs=0,
                    allowed_token_ids=[self.processor.no_speech],
                )  # fmt: skip
                batch.append((NO_SPEECH, prompt(self.previous + [sot]), no_speech))
        self._waiting = {tag: None for tag, _, _ in batch}
        return batch

    def add_output(self, tag: str, output: Any) -> None:
        """Take the final output of the request tagged `tag`; once every request of the
        batch is in, advance (the language found, or the window's segments and `seek`)."""
        if tag not in self._waiting:
            raise ValueError(f"no {tag!r} request is waiting")
        self._waiting[tag] = output
        self.usage[0] += output.usage.prompt_tokens
        self.usage[1] += output.usage.completion_tokens
        if any(out is None for out in self._waiting.values()):
            return
        outputs, self._waiting = self._waiting, {}
        if DETECT in outputs:
            self.language_id = outputs[DETECT].outputs[0].token_ids[0]
            return
        self._add_window(outputs[WINDOW].outputs[0], outputs.get(NO_SPEECH))

    def _add_window(self, completion: Any, no_speech: Any) -> None:
        tokens = list(completion.token_ids)
        self.token_ids += tokens
        self.finish_reason = completion.finish_reason
        if tokens and tokens[-1] == self.processor.eos:
            tokens = tokens[:-1]
        begin = self.processor.timestamp_begin
        window_frames = min(self.num_frames - self.seek, self.processor.num_frames)
        pieces, advance = split_window(tokens, begin, window_frames)
        text_of = self.processor.decode_text
        avg_logprob = None
        if completion.cumulative_logprob is not None and completion.token_ids:
            avg_logprob = completion.cumulative_logprob / len(completion.token_ids)
        no_speech_prob = None
        if no_speech is not None:
            no_speech_prob = math.exp(no_speech.outputs[0].cumulative_logprob)
        offset = self.seek * TIME_PRECISION / FRAMES_PER_STEP
        for start, end, piece in pieces:
            self.segments.append(
                Segment(
                    id=len(self.segments),
                    seek=self.seek,
                    start=offset + start,
                    end=offset + end,
                    text=text_of(piece),
                    tokens=piece,
                    temperature=self.params.temperature,
                    avg_logprob=avg_logprob,
                    compression_ratio=compression_ratio(text_of(tokens)),
                    no_speech_prob=no_speech_prob,
                )  # fmt: skip
            )
        # an output that would not move (a `<|0.00|>` pair without the timestamp rules)
        # skips the window instead of decoding it forever
        self.seek += advance if advance > 0 else window_frames

    def result(self) -> Transcript:
        """The finished transcript (its text: every segment's tokens, decoded)."""
        if not self.done:
            raise ValueError("the transcription is not finished")
        tokens = [t for s in self.segments for t in s.tokens]
        return Transcript(
            self.processor.decode_text(tokens), self.language, self.duration, self.segments,
            self.token_ids, self.usage[0], self.usage[1], self.finish_reason, self.timestamps,
        )  # fmt: skip
