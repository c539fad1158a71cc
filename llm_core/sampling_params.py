"""Per-request sampling parameters, validated at construction (vLLM-compatible names)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.timestamp_rules import TimestampRules

# Temperatures below this are treated as greedy (argmax), as vLLM does.
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20  # vLLM's default `max_logprobs`: the most top logprobs a request may ask
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
# Fields a model's generation_config.json may default (vLLM reads the same ones).
GENERATION_CONFIG_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
)


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


KINDS = ("json", "regex", "choice", "grammar", "structural_tag")  # (json_object: a flag)


@dataclass(config=ConfigDict(extra="forbid"))
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's `StructuredOutputsParams`): exactly one of
    `KINDS` or `json_object`. Compiled with xgrammar."""

    json: str | dict | None = None
    """A JSON schema (a dict or its JSON text): the output is one JSON value matching it."""
    regex: str | None = None
    """The output matches this regular expression."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF (GBNF) grammar with a `root` rule."""
    json_object: bool | None = None
    """The output is any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    structural_tag: str | dict | None = None
    """xgrammar's structural tag (dict or JSON text): `{"type": "structural_tag", "format"}` or
    the older `{"structures": [{"begin", "schema", "end"}], "triggers"}`."""
    disable_any_whitespace: bool = False
    """JSON without free whitespace between tokens (compact output)."""

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in KINDS if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "set exactly one of json, regex, choice, grammar, json_object, structural_tag"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one string")
        return self

    @property
    def kind(self) -> str:
        """Which constraint is set: one of `KINDS`, or "json_object"."""
        for key in KINDS:
            if getattr(self, key) is not None:
                return key
        return "json_object"


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
    """Return the chosen token's logprob plus the top-N logprobs per generated token (N up to
    the engine's `max_logprobs`, default 20)."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """Which distribution `logprobs` are read from: the model's raw logits, or the logits after
    the logit rules (allowed ids, suppressed tokens, timestamp rules, bias, ...) and penalties,
    before temperature and top-k/p (Whisper's `avg_logprob`, as transformers and OpenAI's
    whisper compute it)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    detokenize: bool = True
    """Turn the output tokens into text; False: `text` stays "" (token ids only, no tokenizer
    work per token, as RL rollouts want). Stop strings need the text."""
    min_tokens: int = 0
    """EOS, `stop_token_ids` and stop strings do not end generation before this many tokens."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value in [-100, 100] added to its logit before sampling."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be generated."""
    suppress_tokens: list[int] | None = None
    """Token ids never generated (transformers' `suppress_tokens`; Whisper's generation config
    lists its non-speech tokens)."""
    begin_suppress_tokens: list[int] | None = None
    """Token ids not generated as the first output token (transformers'
    `begin_suppress_tokens`; Whisper: the blank and end-of-text)."""
    timestamp_rules: TimestampRules | None = None
    """Whisper's timestamp rules (transformers' `WhisperTimeStampLogitsProcessor`: timestamps
    in pairs, never decreasing, forced when likelier than any text token); set by the
    transcription path (`Pipeline(audio=..., timestamps=True)`), see `TimestampRules`."""
    bad_words: list[str] = Field(default_factory=list)
    """Words never generated (each banned as tokenized with and without a leading space)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob plus the top-N at every prompt position (N up to the
    engine's `max_logprobs`)."""
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens (-1: as many as max_model_len allows)."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (see the class)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidInputError(_readable(exc)) from None

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature is 0)."""
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalties change the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def has_logit_rules(self) -> bool:
        """Per-request masks or biases apply to the logits before sampling."""
        return bool(
            self.logit_bias
            or self.allowed_token_ids is not None
            or self.bad_words
            or self.min_tokens
            or self.suppress_tokens
            or self.begin_suppress_tokens
            or self.timestamp_rules is not None
            or self.structured_outputs is not None
        )

    @property
    def is_plain_argmax(self) -> bool:
        """The token is the argmax of the raw logits and nothing else is read from them."""
        return (
            self.is_greedy
            and self.logprobs is None
            and not self.has_penalties
            and not self.has_logit_rules
        )

    @property
    def needs_host_tokens(self) -> bool:
        """Sampling the next token needs the previous one on the host (so no overlap of
        steps): penalties count tokens, bad words, grammars and timestamp rules follow them,
        logprobs are read back with them."""
        return (
            self.has_penalties
            or self.logprobs is not None
            or self.prompt_logprobs is not None
            or bool(self.bad_words)
            or self.timestamp_rules is not None
            or self.structured_outputs is not None
        )

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """A copy whose fields not set explicitly take `defaults` (e.g. generation_config.json);
        `model_fields_set` stays the explicitly set fields."""
        update = {k: v for k, v in defaults.items() if k not in self.model_fields_set}
        if not update:
            return self
        merged = self.model_copy(update=update)
        merged.__pydantic_fields_set__ = set(self.model_fields_set)
        return merged

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
        if value is not None:  # the engine's max_logprobs bounds it (request_checks)
            _check_range(value, 0, math.inf)
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        # An empty stop string would match before the first token.
        if any(s == "" for s in value):
            raise ValueError("must not contain empty strings")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids", "suppress_tokens",
                     "begin_suppress_tokens")  # fmt: skip
    @classmethod
    def _check_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(t < 0 for t in value):
            raise ValueError("must contain only token ids >= 0")
        return value

    @field_validator("allowed_token_ids")
    @classmethod
    def _check_allowed_not_empty(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError("must list at least one token id")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _check_min_tokens(cls, value: int, info: ValidationInfo) -> int:
        _check_range(value, 0, math.inf)
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"must not exceed max_tokens={max_tokens}")
        return value

    @field_validator("detokenize")
    @classmethod
    def _check_detokenize(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("stop"):
            raise ValueError("must be True with stop strings (they match the text)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if token < 0:
                raise ValueError(f"has token id {token} (token ids are >= 0)")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"values must be in [-100, 100] (token {token}: {bias})")
        return value

    @field_validator("bad_words")
    @classmethod
    def _check_bad_words(cls, value: list[str]) -> list[str]:
        if any(not w.strip() for w in value):
            raise ValueError("must not contain empty words")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _check_prompt_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            _check_range(value, 0, math.inf)
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncate(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("must be >= 1 (or -1: up to max_model_len)")
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
