"""`LLM.get_metrics()`: the engine's counters, gauges and histograms as vLLM's
`vllm.v1.metrics.reader` returns them (`Counter`, `Gauge`, `Histogram`, `Vector`; a histogram's
`buckets` maps each upper bound, as text, to its cumulative count, "+Inf" last).

Names are the server's `/metrics` names (vLLM's with `vllm:` -> `polymodal:`). Offline, the
latencies start at the request's arrival in the engine (the server's `/metrics` starts them at
the HTTP arrival): `time_to_first_token_seconds`, `e2e_request_latency_seconds`, and the phases
`request_queue_time_seconds` (arrival -> first step), `request_prefill_time_seconds` (first
step -> first token), `request_decode_time_seconds` (first token -> finished),
`request_time_per_output_token_seconds`. Tokens: `prompt_tokens`, `generation_tokens`,
`request_prompt_tokens` / `request_generation_tokens` (per request), `prefix_cache_queries` /
`prefix_cache_hits` (prompt tokens looked up / found cached). `request_success` counts finished
sequences by `finished_reason`. Gauges (read at the call): `num_requests_running`,
`num_requests_waiting`, `kv_cache_usage_perc`; counters `num_preemptions` and
`spec_decode_num_drafts` / `_num_draft_tokens` / `_num_accepted_tokens`, and the vector
`spec_decode_num_accepted_tokens_per_pos` (drafts accepted at each position; empty without
speculative decoding).

No dependency: plain accumulators fed by the engine (`Engine.on_finished`); the bucket bounds
are the server's (`server/metrics.py` takes them from here).
"""

from __future__ import annotations

import bisect
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any

from polymodal.llm_core.outputs import RequestOutput

# seconds: 1 ms .. 40 min, ~2.5x apart at the low end (vLLM's TTFT buckets start at 1 ms too)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)  # fmt: skip
# token counts per request: 1, 2, 5, 10, ... as vLLM's build_1_2_5_buckets
COUNT_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Vector(Metric):
    values: list[int]


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]


class _Histogram:
    """Counts per bucket (upper bounds `bounds`, then +Inf) and the sum of what was seen."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def snapshot(self, name: str) -> Histogram:
        cumulative, buckets = 0, {}
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            cumulative += count
            buckets[bound] = cumulative
        return Histogram(name, {}, cumulative, self.sum, buckets)


# engine_phases' keys -> their histograms
PHASE_HISTOGRAMS = {
    "queue": "request_queue_time_seconds",
    "prefill": "request_prefill_time_seconds",
    "decode": "request_decode_time_seconds",
    "per_output_token": "request_time_per_output_token_seconds",
}


def engine_phases(out: RequestOutput) -> dict[str, float]:
    """Seconds of a finished request's phases in the engine, those its times give: queue
    (arrival -> first step), prefill (first step -> first token), decode (first token -> the
    end) and per_output_token (decode over the tokens after the first). The server's
    `/metrics` observes the same phases."""
    m = out.metrics
    if m is None:
        return {}
    phases = {}
    if m.first_scheduled_time is not None:
        phases["queue"] = m.time_in_queue
    first, end = m.first_token_time, m.finished_time or m.last_token_time
    if first is not None and m.first_scheduled_time is not None:
        phases["prefill"] = first - m.first_scheduled_time
    if first is not None and end is not None:
        phases["decode"] = end - first
        later = max((len(c.token_ids) for c in out.outputs), default=1) - 1
        if later > 0:
            phases["per_output_token"] = phases["decode"] / later
    return phases


class EngineMetrics:
    """What `get_metrics` reports: fed each finished request (`observe`), read with the
    engine's live state (`snapshot`)."""

    HISTOGRAMS = {
        "time_to_first_token_seconds": LATENCY_BUCKETS,
        "e2e_request_latency_seconds": LATENCY_BUCKETS,
        "request_queue_time_seconds": LATENCY_BUCKETS,
        "request_prefill_time_seconds": LATENCY_BUCKETS,
        "request_decode_time_seconds": LATENCY_BUCKETS,
        "request_time_per_output_token_seconds": TOKEN_BUCKETS,
        "request_prompt_tokens": COUNT_BUCKETS,
        "request_generation_tokens": COUNT_BUCKETS,
    }

    def __init__(self):
        self.histograms = {name: _Histogram(b) for name, b in self.HISTOGRAMS.items()}
        self.tokens = Tally()  # prompt / generation / prefix cache queries and hits
        self.finished = Tally()  # finished sequences by reason

    def observe(self, out: RequestOutput) -> None:
        """One finished request (all its sequences)."""
        h = self.histograms
        prompt, generated = out.usage.prompt_tokens, out.usage.completion_tokens
        self.tokens.update(prompt_tokens=prompt, generation_tokens=generated)
        if out.num_cached_tokens is not None:
            self.tokens.update(prefix_cache_queries=prompt, prefix_cache_hits=out.num_cached_tokens)
        h["request_prompt_tokens"].observe(prompt)
        h["request_generation_tokens"].observe(generated)
        self.finished.update(c.finish_reason or "abort" for c in out.outputs)
        m = out.metrics
        if m is None:
            return
        end = m.finished_time or m.last_token_time
        if end is not None:
            h["e2e_request_latency_seconds"].observe(end - m.arrival_time)
        if m.first_token_time is not None:
            h["time_to_first_token_seconds"].observe(m.first_token_time - m.arrival_time)
        for phase, seconds in engine_phases(out).items():
            h[PHASE_HISTOGRAMS[phase]].observe(seconds)

    def snapshot(self, engine: Any) -> list[Metric]:
        """Every metric now, `engine`'s gauges and counters read at the call."""
        name = "polymodal:{}".format
        scheduler = engine.scheduler
        total = max(1, scheduler.kv.num_blocks)
        out: list[Metric] = [
            Gauge(name("num_requests_running"), {}, len(scheduler.running)),
            Gauge(name("num_requests_waiting"), {}, engine.num_waiting),
            Gauge(name("kv_cache_usage_perc"), {}, 1 - engine.num_free_blocks / total),
            Counter(name("num_preemptions"), {}, scheduler.num_preemptions),
        ]
        for key in ("prompt_tokens", "generation_tokens", "prefix_cache_queries",
                    "prefix_cache_hits"):  # fmt: skip
            out.append(Counter(name(key), {}, self.tokens[key]))
        for reason in sorted(self.finished):
            labels = {"finished_reason": reason}
            out.append(Counter(name("request_success"), labels, self.finished[reason]))
        spec = engine.speculation
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            value = getattr(spec, key) if spec is not None else 0
            out.append(Counter(name(f"spec_decode_{key}"), {}, value))
        per_pos = list(spec.accepted_per_pos) if spec is not None else []
        out.append(Vector(name("spec_decode_num_accepted_tokens_per_pos"), {}, per_pos))
        out.extend(h.snapshot(name(key)) for key, h in self.histograms.items())
        return out
