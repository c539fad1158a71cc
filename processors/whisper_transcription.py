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

Temperature fallback (`temperatures=(0.0, 0.2, ..., 1.0)`, transformers'
`generate_with_fallback`): a window whose output fails a threshold is decoded again at the next
temperature (the last attempt is kept whatever it scores; sampled from the `FALLBACK_TOP_K`
likeliest tokens unless the request sets top_k, as `generate`). It fails when its token ids'
compression ratio (`token_compression_ratio`) is above `compression_ratio_threshold`, or its
average logprob (end-of-text included, after the logit rules) is below `logprob_threshold`; but
when also P(`<|nospeech|>`) is above `no_speech_threshold`, the window is silence: skipped
without a segment. `condition_on_prev_tokens=True`: each window's prompt is `<|startofprev|>`
and the last `max_target_positions // 2 - 1` tokens of the previous text and every segment so
far; a window decoded at temperature >= 0.5 turns it off for the next window only. Off (the
default), every window starts from the previous text alone.

`word_timestamps=True` times each output token (and word) from the cross-attention of the
alignment heads (`whisper_words.py`).

`Transcription` is the state of one clip and builds its engine requests; a driver (the SDK's
`polymodal.speech` for `LLM`, the audio routes for the server) runs them, many clips in one
batch, and feeds the outputs back. With `details=True` each window also gets the chosen
tokens' logprobs (`avg_logprob`) and a one-step request for `<|nospeech|>`'s probability after
`<|startoftranscript|>` (`no_speech_prob`, as OpenAI's whisper reads it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.types import ProcessedPrompt
from polymodal.processors.whisper_segments import (
    FRAMES_PER_STEP,
    TIME_PRECISION,
    Segment,
    Transcript,
    compression_ratio,
    split_window,
    token_compression_ratio,
)

DETECT, WINDOW, NO_SPEECH = "detect", "window", "no_speech"


# transformers' `generate` samples a fallback retry from the 50 likeliest tokens (its default
# top_k: Whisper's generation_config.json sets none); a request's own top_k is kept
FALLBACK_TOP_K = 50


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
        clip_hash: str | None = None,
        language: str | None = None,
        task: str | None = None,
        timestamps: bool = False,
        previous_text: str | None = None,
        details: bool = False,
        temperatures: Sequence[float] | None = None,
        compression_ratio_threshold: float | None = None,
        logprob_threshold: float | None = None,
        no_speech_threshold: float | None = None,
        condition_on_prev_tokens: bool = False,
        word_timestamps: bool = False,
        aligner: Callable[..., torch.Tensor] | None = None,
    ):
        self.processor = processor
        self.features = features  # [num_mel_bins, frames], on the host or the model's device
        # the clip's content hash: a window's is it and the window's start (None: its features')
        self.clip_hash = clip_hash
        self.duration = duration
        self.num_frames = features.shape[-1]
        self.timestamps = timestamps or self.num_frames > processor.num_frames
        self.task = task
        self.details = details
        processor.init_ids(None, task)  # a bad task fails here, before any request
        self.language_id = processor.language_id(language) if language is not None else None
        self.detect = self.language_id is None and processor.multilingual
        self.previous = processor.previous_ids(previous_text)
        self.temperatures = tuple(temperatures) if temperatures else (params.temperature,)
        self.thresholds = (compression_ratio_threshold, logprob_threshold, no_speech_threshold)
        check_fallback(self.temperatures, *self.thresholds)
        self.condition_on_prev_tokens = condition_on_prev_tokens
        self.condition = condition_on_prev_tokens  # this window's (off after a hot one)
        self.words = None
        if word_timestamps:
            from polymodal.processors.whisper_words import WordTimer

            self.words = WordTimer(processor, aligner, self._clip_frames(processor))
        update: dict[str, Any] = {}
        if self.timestamps:
            update["timestamp_rules"] = processor.timestamp_rules()
        if details or logprob_threshold is not None:
            update["logprobs"] = 0
            update["logprobs_mode"] = "processed_logprobs"
        if "max_tokens" not in params.model_fields_set:  # up to the context, as `generate`
            update["max_tokens"] = None
        if len(self.temperatures) > 1 and "top_k" not in params.model_fields_set:
            update["top_k"] = FALLBACK_TOP_K
        self.params = params.model_copy(update=update)
        self.seek = 0
        self.attempt = 0  # index into `temperatures` of this window's decoding
        self.no_speech_prob: float | None = None  # this window's
        self.segments: list[Segment] = []
        self.token_ids: list[int] = []
        self.usage = [0, 0]
        self.finish_reason: str | None = None
        self._waiting: dict[str, Any] = {}

    @classmethod
    def load(
        cls,
        processor: Any,
        audio: Any,
        params: SamplingParams,
        device: Any = None,
        **options: Any,
    ):
        """A transcription of `audio` (anything `load_audio` takes), its features computed
        (on `device`, the model's, for a clip of one window: `WhisperProcessor.features`)."""
        features, duration, clip_hash = processor.features(audio, device=device)
        return cls(processor, features, duration, params, clip_hash=clip_hash, **options)

    def _clip_frames(self, processor: Any) -> int:
        """The clip's own mel frames (transformers' attention-mask length), padding left out."""
        samples = round(self.duration * processor.sampling_rate)
        return -(-samples // processor.extractor.hop_length)

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

    def _previous_ids(self) -> list[int]:
        """The window's `<|startofprev|>` context (transformers' `_prepare_decoder_input_ids`):
        conditioned, the last `max_target_positions // 2 - 1` tokens of the previous text and
        every segment so far (a segment ending in a timestamp pair without its last one);
        else the previous text alone."""
        if not self.condition or not (self.segments or self.previous):
            return self.previous
        begin = self.processor.timestamp_begin
        tokens = list(self.previous[1:])
        for segment in self.segments:
            ids = segment.tokens
            tokens += ids[:-1] if len(ids) > 2 and ids[-2] >= begin else ids
        keep = self.processor.max_target_positions // 2 - 1
        return [self.processor.prev, *tokens[-keep:]]

    def requests(self) -> list[tuple[str, ProcessedPrompt, SamplingParams]]:
        """The next requests (tagged `detect`, `window`, `no_speech`); [] when done or while
        the last batch's outputs are not all in."""
        if self.done or self._waiting:
            return []
        key = f"{self.clip_hash}@{self.seek}" if self.clip_hash else None
        item = self.processor.window_item(self._window(), key=key)
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
            previous = self._previous_ids()
            self._prompt_ids = previous + init
            params = self.params.model_copy(update={"temperature": self.temperature})
            batch = [(WINDOW, prompt(self._prompt_ids), params)]
            wants_no_speech = self.details or self.thresholds[2] is not None
            if wants_no_speech and self.attempt == 0:  # the same for every attempt
                no_speech = SamplingParams(
                    temperature=0.0, max_tokens=1, logprobs=0,
                    allowed_token_ids=[self.processor.no_speech],
                )  # fmt: skip
                batch.append((NO_SPEECH, prompt(previous + [sot]), no_speech))
        self._waiting = {tag: None for tag, _, _ in batch}
        return batch

    @property
    def temperature(self) -> float:
        """The temperature of this window's current attempt."""
        return self.temperatures[self.attempt]

    def add_output(self, tag: str, output: Any) -> None:
        """Take the final output of the request tagged `tag`; once every request of the
        batch is in, advance (the language found, a retry at the next temperature, or the
        window's segments and `seek`)."""
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
        if NO_SPEECH in outputs:
            self.no_speech_prob = math.exp(outputs[NO_SPEECH].outputs[0].cumulative_logprob)
        completion = outputs[WINDOW].outputs[0]
        retry, skip = self._judge(completion)
        if retry and self.attempt + 1 < len(self.temperatures):
            self.attempt += 1  # decode the window again, hotter
            return
        # transformers conditions the next window only on a cool one (temperature < 0.5)
        self.condition = self.condition_on_prev_tokens and self.temperature < 0.5
        window_frames = min(self.num_frames - self.seek, self.processor.num_frames)
        if skip:  # silence: no segment, on to the next window
            self.seek += window_frames
        else:
            self._add_window(completion)
        self.attempt = 0
        self.no_speech_prob = None

    def _avg_logprob(self, completion: Any) -> float | None:
        if completion.cumulative_logprob is None or not completion.token_ids:
            return None
        return completion.cumulative_logprob / len(completion.token_ids)

    def _judge(self, completion: Any) -> tuple[bool, bool]:
        """(decode again hotter, skip as silence) for one attempt: transformers'
        `_need_fallback` on the tokens with end-of-text."""
        ratio_limit, logprob_limit, no_speech_limit = self.thresholds
        tokens = list(completion.token_ids)
        retry = skip = False
        ratio = token_compression_ratio(tokens, self.processor.vocab_size)
        if ratio_limit is not None and ratio > ratio_limit:
            retry = True
        avg_logprob = self._avg_logprob(completion)
        if logprob_limit is not None and avg_logprob < logprob_limit:
            retry = True
            if no_speech_limit is not None and self.no_speech_prob > no_speech_limit:
                retry, skip = False, True
        return retry, skip

    def _add_window(self, completion: Any) -> None:
        tokens = list(completion.token_ids)
        self.token_ids += tokens
        self.finish_reason = completion.finish_reason
        times = None
        if self.words is not None:  # each output token's time in the window
            times = self.words.token_times(self._window(), self._prompt_ids, tokens, self.seek)
        if tokens and tokens[-1] == self.processor.eos:
            tokens = tokens[:-1]
        begin = self.processor.timestamp_begin
        window_frames = min(self.num_frames - self.seek, self.processor.num_frames)
        pieces, advance = split_window(tokens, begin, window_frames)
        text_of = self.processor.decode_text
        offset = self.seek * TIME_PRECISION / FRAMES_PER_STEP
        first = 0
        for start, end, piece in pieces:
            segment = Segment(
                id=len(self.segments),
                seek=self.seek,
                start=offset + start,
                end=offset + end,
                text=text_of(piece),
                tokens=piece,
                temperature=self.temperature,
                avg_logprob=self._avg_logprob(completion),
                compression_ratio=compression_ratio(text_of(tokens)),
                no_speech_prob=self.no_speech_prob,
            )  # fmt: skip
            if times is not None:
                segment.token_timestamps = [offset + t for t in times[first : first + len(piece)]]
                stamps = segment.token_timestamps
                segment.words = self.words.words(piece, stamps, offset, self.language)
            first += len(piece)
            self.segments.append(segment)
        # an output that would not move (a `<|0.00|>` pair without the timestamp rules)
        # skips the window instead of decoding it forever
        self.seek += advance if advance > 0 else window_frames

    def text_so_far(self) -> str:
        """The text of the segments accepted so far (`result().text` once done)."""
        return self.processor.decode_text([t for s in self.segments for t in s.tokens])

    def result(self) -> Transcript:
        """The finished transcript (its text: every segment's tokens, decoded)."""
        if not self.done:
            raise ValueError("the transcription is not finished")
        tokens = [t for s in self.segments for t in s.tokens]
        return Transcript(
            self.processor.decode_text(tokens), self.language, self.duration, self.segments,
            self.token_ids, self.usage[0], self.usage[1], self.finish_reason, self.timestamps,
        )  # fmt: skip


def check_fallback(
    temperatures: tuple[float, ...],
    compression_ratio_threshold: float | None,
    logprob_threshold: float | None,
    no_speech_threshold: float | None,
) -> None:
    """InvalidInputError naming the option for a fallback setting that cannot work."""
    if not temperatures or any(not 0.0 <= t < math.inf for t in temperatures):
        raise InvalidInputError(
            f"temperature={list(temperatures)}: give one or more temperatures >= 0"
        )
    if no_speech_threshold is not None and logprob_threshold is None:
        raise InvalidInputError(
            "no_speech_threshold needs logprob_threshold (a window is skipped as silence when "
            "its no-speech probability is above the one and its avg logprob below the other)"
        )
