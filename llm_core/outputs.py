"""Typed results of generation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Usage:
    """Token counts, as the OpenAI API reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Timings:
    """Seconds from arrival: to the first output token and to the end (None until then)."""

    time_to_first_token: float | None = None
    total: float | None = None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (`time.time()` seconds) of one request's life, as vLLM reports them."""

    arrival_time: float
    first_scheduled_time: float | None = None  # first step that ran any of its tokens
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        """Seconds from arrival until its first step."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence (there are `n` per request)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: top-N token id -> logprob
    delta_text: str = ""  # text added by the latest step (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    # sum of the chosen tokens' logprobs; set when `logprobs` was requested (as vLLM)
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """State of one request after an engine step (or at the end)."""

    request_id: str
    prompt_token_ids: list[int] | None  # None: the prompt was given as embeddings
    outputs: list[CompletionOutput]
    finished: bool = False
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    prompt: str | None = None
    # per prompt token (the first is None): its logprob and the top-N, when requested
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics | None = None
    # vLLM's: prompt tokens served from the prefix cache when it was first scheduled
    num_cached_tokens: int | None = None

    @property
    def text(self) -> str:
        """The first sequence's text (the common n=1 case)."""
        return self.outputs[0].text
