"""Prometheus metrics of one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from polymodal.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Request counts, token counts, latencies and engine gauges, exported on `/metrics`."""

    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "polymodal_requests",
            "Finished requests by endpoint and outcome (ok, client_error, aborted, error).",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "polymodal_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "polymodal_generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.latency = Histogram(
            "polymodal_request_latency_seconds",
            "Seconds from arrival to the last token.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "polymodal_time_to_first_token_seconds",
            "Seconds from arrival to the first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        stats = engine.stats
        gauges = {
            "polymodal_num_requests_running": ("Requests in the running batch.", "num_running"),
            "polymodal_num_requests_waiting": ("Requests queued or processing.", "num_waiting"),
            "polymodal_kv_free_blocks": ("Free KV cache blocks.", "num_free_blocks"),
            "polymodal_kv_total_blocks": ("All KV cache blocks.", "num_total_blocks"),
        }
        for name, (doc, attr) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda a=attr: getattr(stats, a))

    def observe(self, endpoint: str, status: str, seconds: float, usage=None, ttft=None) -> None:
        """Count one finished request (usage: a polymodal Usage, when tokens were produced)."""
        self.requests.labels(endpoint, status).inc()
        self.latency.labels(endpoint).observe(seconds)
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
