"""Incremental detokenization with stop strings, for streaming one sequence's output.

Decoding uses the prefix/read offsets of vLLM/TGI: each step decodes only a small window
`ids[prefix_offset:]` and emits what it adds beyond `ids[prefix_offset:read_offset]`. The
window starts a few prompt tokens back so tokenizers that drop a leading space on the first
token (SentencePiece) still produce it, and text is held back while it ends in "\\ufffd"
(a multi-byte character whose remaining bytes are in tokens not generated yet).

Stop strings: text that could still be the start of a stop string is withheld; once a stop
string appears (it may span tokens) the sequence is finished and the text is cut there.
"""

from __future__ import annotations

from typing import Any

from polymodal.llm_core.sampling_params import SamplingParams

# How many prompt tokens the first decode window reaches back (as vLLM).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's sampled token ids into text deltas, checking stop strings.

    Each `step` costs O(window + longest stop string), independent of the output length.
    Token-based stops (EOS, stop_token_ids, max_tokens) are the engine's job.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        """tokenizer: anything with HF's `decode(ids, skip_special_tokens=...)`."""
        self.tokenizer = tokenizer
        self.params = params
        self._fast_decode = _backend_decode(tokenizer)
        self._stops = list(params.stop)
        # Prompt tail + generated ids; only ids[prefix_offset:] are ever decoded again.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted: list[str] = []  # text already returned by step()/flush()
        self._withheld = ""  # decoded text that may still begin a stop string
        self._finished = False
        self._stop_reason: str | None = None
        self._num_tokens = 0  # stop strings count only from params.min_tokens on

    @property
    def text(self) -> str:
        """Output text so far: emitted text plus any withheld tail (cut at a matched stop)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return (self._emitted[0] if self._emitted else "") + self._withheld

    @property
    def finished(self) -> bool:
        """True once a stop string has matched."""
        return self._finished

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, else None."""
        return self._stop_reason

    def step(self, token_id: int) -> str:
        """Add one generated token; return the new text that is safe to emit now.

        After a stop string matched, further tokens are ignored and "" is returned.
        """
        if self._finished:
            return ""
        self._ids.append(token_id)
        self._num_tokens += 1
        return self._emit(self._decode_delta(force=False))

    def flush(self) -> str:
        """At the end of generation: emit withheld text and any still-incomplete characters.

        A stop string can still match in the text decoded here (then `finished` is set).
        """
        if self._finished:
            return ""
        out = self._emit(self._decode_delta(force=True))
        out += self._withheld
        self._emitted.append(self._withheld)
        self._withheld = ""
        return out

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_delta(self, force: bool) -> str:
        """New complete text from ids[read_offset:], decoded in context of the prefix window."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD means a character's bytes are split across tokens: wait for more.
        if len(new_text) <= len(prefix_text) and not force:
            return ""
        if new_text.endswith(_REPLACEMENT_CHAR) and not force:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _emit(self, delta: str) -> str:
        """Check stop strings on withheld + delta; return the part that is safe to emit."""
        if not delta:
            return ""
        if not self._stops or self._num_tokens < self.params.min_tokens:
            self._emitted.append(delta)
            return delta
        # By the withholding invariant a new match cannot start in already emitted text.
        buffer = self._withheld + delta
        match_at, match = _earliest_match(buffer, self._stops)
        if match is not None:
            end = match_at + len(match) if self.params.include_stop_str_in_output else match_at
            out = buffer[:end]
            self._finished, self._stop_reason = True, match
            self._withheld = ""
        else:
            keep = _longest_partial_stop(buffer, self._stops)
            out, self._withheld = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        self._emitted.append(out)
        return out


def _backend_decode(tokenizer: Any):
    """The Rust tokenizer's own `decode` when the transformers wrapper around it adds nothing
    here (a fast tokenizer class that keeps the base `decode`; no clean-up is asked for): the
    same text at a third of the cost per step. None otherwise."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerFast.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    ):
        return tokenizer.backend_tokenizer.decode
    return None


def _earliest_match(text: str, stops: list[str]) -> tuple[int, str | None]:
    """Position and string of the earliest stop string in `text` (first listed wins ties)."""
    best_at, best = len(text), None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and at < best_at:
            best_at, best = at, stop
    return best_at, best


def _longest_partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
