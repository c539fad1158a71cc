"""Per-request sampling parameters, validated at construction (vLLM-compatible names)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polymodal.llm_core.errors import InvalidInputError

# Temperatures below this are treated as greedy (argmax), as vLLM does.
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20


def _check_range(
    value: float | int, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    """Raise ValueError("must be in [lo, hi]") unless lo <= value <= hi (NaN always fails)."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):  # NaN fails both comparisons
        if hi == math.inf:
            finite = "a finite number " if hi_open else ""
            raise ValueError(f"must be {finite}{'>' if lo_open else '>='} {lo:g}")
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"must be in {left}{lo:g}, {hi:g}{right}")


class SamplingParams(BaseModel):
    """How to pick the next tokens of one request.

    Invalid values raise `InvalidInputError` naming the field and its allowed range, e.g.
    ``SamplingParams.top_p must be in (0, 1], got 1.5``. Token-based stops (EOS,
    `stop_token_ids`, `max_tokens`) are enforced by the engine; `stop` strings by the
    detokenizer.
    """

    model_config = ConfigDict(extra="forbid")

    n: int = 1
    """Number of completions to generate for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 (below 1e-5) means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """HF-style: logits of tokens seen in prompt or output are divided (>0) / multiplied (<0)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted per occurrence from the logit of every generated token."""
    seed: int | None = None
    """Seed of this request's own random stream (batch-independent results)."""
    max_tokens: int | None = 256
    """Most tokens to generate; None means up to the model's context limit."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings (a single string or None are accepted and normalized to a list)."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating after EOS."""
    logprobs: int | None = None
    """Return the chosen token's logprob plus the top-N (0..20) logprobs per generated token."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidInputError(_readable(exc)) from None

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature is 0)."""
        return self.temperature < SAMPLING_EPS

    @field_validator("stop", mode="before")
    @classmethod
    def _normalize_stop(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _normalize_stop_ids(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("n")
    @classmethod
    def _check_n(cls, value: int) -> int:
        _check_range(value, 1, math.inf)
        return value

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        _check_range(value, 0.0, math.inf, hi_open=True)
        return value

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, value: float) -> float:
        _check_range(value, 0.0, 1.0, lo_open=True)
        return value

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, value: int) -> int:
        if value < -1:
            raise ValueError("must be -1 or 0 (off) or >= 1")
        return value

    @field_validator("min_p")
    @classmethod
    def _check_min_p(cls, value: float) -> float:
        _check_range(value, 0.0, 1.0)
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _check_repetition_penalty(cls, value: float) -> float:
        _check_range(value, 0.0, math.inf, lo_open=True, hi_open=True)
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _check_openai_penalty(cls, value: float) -> float:
        _check_range(value, -2.0, 2.0)
        return value

    @field_validator("max_tokens")
    @classmethod
    def _check_max_tokens(cls, value: int | None) -> int | None:
        if value is not None:
            _check_range(value, 1, math.inf)
        return value

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            _check_range(value, 0, MAX_LOGPROBS)
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        # An empty stop string would match before the first token.
        if any(s == "" for s in value):
            raise ValueError("must not contain empty strings")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("must contain only token ids >= 0")
        return value


def _readable(exc: ValidationError) -> str:
    """One line per bad field: 'SamplingParams.<field> <what is allowed>, got <value>'."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            lines.append(f"SamplingParams.{field} is not a sampling parameter")
            continue
        if err["type"] == "value_error":
            # Messages raised by our validators read as a continuation: "must be in ...".
            msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
            lines.append(f"SamplingParams.{field} {msg}, got {err['input']!r}")
        else:
            lines.append(f"SamplingParams.{field}: {err['msg']}, got {err['input']!r}")
    return "; ".join(lines)
