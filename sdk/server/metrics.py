"""Prometheus metrics of one server (own registry, so several apps can live in one process).

Names follow vLLM's (`vllm:` -> `polymodal:`) where vLLM has the same metric, so its dashboards
work with the prefix changed. Latency buckets start at 1 ms: this engine's TTFT for one image
is ~15 ms on an H200, and inter-token latencies are a few ms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from polymodal.async_engine import AsyncEngine
from polymodal.llm_core.outputs import RequestOutput
from polymodal.metrics_reader import LATENCY_BUCKETS, TOKEN_BUCKETS, engine_phases


class ServerMetrics:
    """Request, token and latency metrics plus engine gauges, exported on `/metrics`."""

    def __init__(self, engine: AsyncEngine):
        self.registry = r = CollectorRegistry()

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS, labels=()) -> Histogram:
            return Histogram(f"polymodal:{name}", doc, labels, buckets=buckets, registry=r)

        self.requests = Counter(
            "polymodal:requests",
            "Finished requests by endpoint and outcome (ok, client_error, aborted, error).",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "polymodal:prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "polymodal:generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to the last token.", labels=["endpoint"]
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival (HTTP) to the first token, media included."
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Between streamed outputs, per token they carry.",
            TOKEN_BUCKETS,
        )
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "A request's decode time over its tokens after the first.",
            TOKEN_BUCKETS,
        )
        self.queue = histogram(
            "request_queue_time_seconds", "Queued in the engine until its first step."
        )
        self.prefill = histogram(
            "request_prefill_time_seconds", "First step to first token (prompt and media)."
        )
        self.decode = histogram("request_decode_time_seconds", "First token to the last.")
        # Ours (no vLLM equivalent): with queue and prefill, they split the TTFT in four
        self.preprocess = histogram(
            "request_preprocess_time_seconds",
            "Arrival (HTTP) until queued in the engine: parsing, media loading and processing, "
            "the hand-off to the engine thread.",
        )
        self.delivery = histogram(
            "request_first_token_delivery_seconds",
            "The first token sampled (engine) until the HTTP handler had it.",
        )
        stats = engine.stats
        gauges = {
            "num_requests_running": ("Requests in the running batch.", "num_running"),
            "num_requests_waiting": ("Requests queued or processing.", "num_waiting"),
            "kv_free_blocks": ("Free KV cache blocks.", "num_free_blocks"),
            "kv_total_blocks": ("All KV cache blocks.", "num_total_blocks"),
        }
        for name, (doc, attr) in gauges.items():
            Gauge(f"polymodal:{name}", doc, registry=r).set_function(
                lambda a=attr: getattr(stats, a)
            )
        Gauge(
            "polymodal:kv_cache_usage_perc", "Share of KV cache blocks in use (0-1).", registry=r
        ).set_function(lambda: 1 - stats.num_free_blocks / max(1, stats.num_total_blocks))
        r.register(_SpecDecodeCounters(stats))

    def observe_stream_gap(self, seconds: float, tokens: int) -> None:
        """A streamed output arrived `seconds` after the previous one, carrying `tokens`."""
        if tokens > 0:
            self.itl.observe(seconds / tokens)

    def observe(
        self,
        endpoint: str,
        status: str,
        seconds: float,
        finals: list[RequestOutput] | None = None,
        ttft: float | None = None,
        arrival_wall: float | None = None,
        first_wall: float | None = None,
    ) -> None:
        """Count one ended HTTP request: `seconds` since its arrival, `ttft` to its first
        tokens (both as the server saw them) and, when it finished, its engine outputs (one
        per prompt); `arrival_wall` / `first_wall`: `time.time()` of its arrival and of its
        first tokens at the handler (the engine's phases are wall-clock times too)."""
        self.requests.labels(endpoint, status).inc()
        self.e2e.labels(endpoint).observe(seconds)
        if ttft is not None:
            self.ttft.observe(ttft)
        for final in finals or ():
            self._observe_engine(final, arrival_wall, first_wall)

    def _observe_engine(self, final: RequestOutput, arrival_wall=None, first_wall=None) -> None:
        """One finished engine request's tokens and phases."""
        self.prompt_tokens.inc(final.usage.prompt_tokens)
        self.generation_tokens.inc(final.usage.completion_tokens)
        m = final.metrics
        if m is None or m.first_token_time is None:
            return
        if arrival_wall is not None:
            self.preprocess.observe(max(0.0, m.arrival_time - arrival_wall))
        if first_wall is not None:
            self.delivery.observe(max(0.0, first_wall - m.first_token_time))
        histograms = {"queue": self.queue, "prefill": self.prefill, "decode": self.decode,
                      "per_output_token": self.tpot}  # fmt: skip
        for phase, seconds in engine_phases(final).items():
            histograms[phase].observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _SpecDecodeCounters:
    """Speculative decoding's counters (vLLM's `spec_decode_*`), read from the engine's stats:
    0 without `--speculative-config`. Acceptance rate = accepted / draft tokens."""

    COUNTERS = (
        ("num_drafts", "Sequence steps that checked drafts.", "spec_num_drafts"),
        ("num_draft_tokens", "Draft tokens checked.", "spec_num_draft_tokens"),
        ("num_accepted_tokens", "Draft tokens accepted.", "spec_num_accepted_tokens"),
    )

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        for name, doc, attr in self.COUNTERS:
            value = getattr(self.stats, attr)
            yield CounterMetricFamily(f"polymodal:spec_decode_{name}", doc, value=value)
