"""Whisper's word timestamps, as transformers computes them (`_extract_token_timestamps` with
`return_token_timestamps=True`, then the ASR pipeline's word chunks):

1. the cross-attention weights of the checkpoint's `alignment_heads` (generation_config.json;
   without them the checkpoint has no word timestamps, as in transformers) over the window's
   prompt and output tokens, from the served model (`aligner`: a teacher-forced pass,
   `llm_core/models/whisper_alignment.py`); the prompt's rows left out, the encoder rows cut
   to the clip's frames from `seek`;
2. each head's weights normalized over the tokens, a median filter of `median_filter_width`
   along time, the heads averaged; dynamic time warping of the negated matrix: each output
   token's time is where its row first appears on the path (the last token repeats the time
   before it);
3. words: text tokens grouped at spaces and punctuation (at unicode points for languages
   written without spaces), leading and trailing punctuation merged into the words; a word
   spans from the time of the token before its first to the time of its last (rounded to
   0.01 s, as the pipeline's chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.whisper_segments import TIME_PRECISION, Word

UNSPACED = {"zh", "ja", "th", "lo", "my", "yue"}
PREPENDED = "\"'“¡¿([{-"
APPENDED = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """A median of `width` (odd) along the last dim of `[batch, heads, tokens, time]`,
    edges reflected."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    return x.unfold(-1, width, 1).sort()[0][..., pad]


def dynamic_time_warping(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `[tokens, time]`: (token indices, time indices),
    ties broken as transformers' `_dynamic_time_warping` breaks them."""
    rows, cols = cost_matrix.shape
    cost = np.full((rows + 1, cols + 1), np.inf, dtype=np.float32)
    trace = -np.ones((rows + 1, cols + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, cols + 1):
        for i in range(1, rows + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = cost_matrix[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = rows, cols
    trace[0, :] = 2
    trace[:, 0] = 1
    text, time = [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    return np.array(text[::-1]), np.array(time[::-1])


def token_times(
    weights: torch.Tensor, num_prompt: int, num_tokens: int, num_frames: int, filter_width: int
) -> list[float]:
    """Each of `num_tokens` output tokens' time in seconds from the window's start.
    `weights`: `[heads, num_prompt + num_tokens - 1, rows]` cross-attention; `num_frames`: the
    clip's mel frames from the window's start (the encoder rows past them are cut)."""
    weights = weights[None, :, num_prompt:, : num_frames // 2].float()  # [1, heads, n - 1, t]
    # transformers cuts twice: a window past the clip's end (num_frames < 0) loses 2x as much
    weights = weights[..., : num_frames // 2]
    if weights.shape[2] == 0:  # one output token: no row to align
        return [0.0] * num_tokens
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    matrix = median_filter((weights - mean) / std, filter_width).mean(dim=1)[0]
    text, time = dynamic_time_warping(-matrix.double().numpy())
    jumps = np.pad(np.diff(text), (1, 0), constant_values=1).astype(bool)
    jump_times = (time[jumps] * TIME_PRECISION).tolist()
    return jump_times + jump_times[-1:]


def split_words(
    decode: Callable[[list[int]], str], tokens: list[int], unspaced: bool = False
) -> tuple[list[str], list[list[int]]]:
    """Text tokens grouped into words: (words, each word's token indices), transformers'
    `_combine_tokens_into_words` (OpenAI whisper's `split_to_word_tokens`)."""
    full = decode(tokens)
    pieces: list[tuple[str, list[int]]] = []  # tokens that decode to whole unicode points
    current: list[int] = []
    offset = 0
    for index in range(len(tokens)):
        current.append(index)
        text = decode([tokens[k] for k in current])
        bad = text.find("\ufffd")
        if bad < 0 or offset + bad >= len(full) or full[offset + bad] == "\ufffd":
            pieces.append((text, current))
            current = []
            offset += len(text)
    if unspaced:
        words, indices = [p[0] for p in pieces], [p[1] for p in pieces]
    else:
        words, indices = [], []
        for text, where in pieces:
            if text.startswith(" ") or text.strip() in PUNCTUATION or not words:
                words.append(text)
                indices.append(list(where))
            else:
                words[-1] += text
                indices[-1] += where
    _merge_punctuation(words, indices)
    return [w for w in words if w], [i for i in indices if i]


def _merge_punctuation(words: list[str], indices: list[list[int]]) -> None:
    """Opening punctuation joins the word after it, closing punctuation the word before."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i].startswith(" ") and words[i].strip() in PREPENDED:
            words[j], indices[j] = words[i] + words[j], indices[i] + indices[j]
            words[i], indices[i] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i].endswith(" ") and words[j] in APPENDED:
            words[i], indices[i] = words[i] + words[j], indices[i] + indices[j]
            words[j], indices[j] = "", []
        else:
            i = j
        j += 1


class WordTimer:
    """Token and word times of one clip's windows (see the module docstring)."""

    def __init__(self, processor: Any, aligner: Callable[..., torch.Tensor] | None, frames: int):
        if not processor.alignment_heads:
            raise InvalidInputError(
                "word timestamps: this checkpoint's generation_config.json has no "
                "alignment_heads (the cross-attention heads that follow the audio)"
            )
        if aligner is None:
            raise InvalidInputError("word timestamps need the model's weights (an aligner)")
        self.processor = processor
        self.aligner = aligner
        self.clip_frames = frames
        special = set(getattr(processor.tokenizer, "all_special_ids", ()))
        self.is_text = lambda t: t < processor.timestamp_begin and t not in special

    def token_times(
        self, window: torch.Tensor, prompt_ids: list[int], tokens: list[int], seek: int
    ) -> list[float]:
        """Each output token's time (s) from the window's start; `tokens` with end-of-text."""
        heads = self.processor.alignment_heads
        weights = self.aligner(window, prompt_ids + tokens[:-1], heads)
        frames = self.clip_frames - seek
        width = self.processor.median_filter_width
        return token_times(weights, len(prompt_ids), len(tokens), frames, width)

    def words(self, tokens: list[int], times: list[float], start: float, language: str | None):
        """The words of one segment's `tokens` (their `times` in seconds, `start` the time
        before its first token)."""
        spans, text_tokens = [], []
        for k, token in enumerate(tokens):
            if self.is_text(token):
                before = times[k - 1] if k > 0 else start
                spans.append((round(before, 2), round(times[k], 2)))
                text_tokens.append(token)
        decode = lambda ids: self.processor.tokenizer.decode(ids)  # noqa: E731
        words, indices = split_words(decode, text_tokens, language in UNSPACED)
        return [Word(w, spans[i[0]][0], spans[i[-1]][1]) for w, i in zip(words, indices)]
