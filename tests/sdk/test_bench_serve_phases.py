"""The serve bench's reading of the server's latency histograms (`/metrics` text)."""

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from polymodal.bench.serve import histogram_quantiles


def _metrics(values, buckets=(0.1, 0.5, 1.0, 2.5)) -> str:
    registry = CollectorRegistry()
    h = Histogram("polymodal:x_seconds", "doc", buckets=buckets, registry=registry)
    for v in values:
        h.observe(v)
    return generate_latest(registry).decode()


def test_quantiles_interpolate_inside_the_bucket():
    # 10 in (0, 0.1], 10 in (0.5, 1.0]: the median is the 0.1 edge, p90 three fifths into (0.5, 1]
    text = _metrics([0.05] * 10 + [0.7] * 10)
    q = histogram_quantiles(text, "polymodal:x_seconds", (0.25, 0.5, 0.9))
    assert q["p25"] == pytest.approx(0.05)
    assert q["p50"] == pytest.approx(0.1)
    assert q["p90"] == pytest.approx(0.5 + 0.8 * 0.5)


def test_empty_or_missing_histogram_is_none():
    assert histogram_quantiles(_metrics([]), "polymodal:x_seconds") is None
    assert histogram_quantiles(_metrics([0.2]), "polymodal:other_seconds") is None


def test_quantiles_since_an_earlier_scrape_count_only_what_came_between():
    """A second burst's phases: the counts of the scrape before it are taken off."""
    registry = CollectorRegistry()
    h = Histogram("polymodal:x_seconds", "doc", buckets=(0.1, 0.5, 1.0, 2.5), registry=registry)
    for _ in range(10):
        h.observe(2.0)  # the first burst: slow
    before = generate_latest(registry).decode()
    for _ in range(10):
        h.observe(0.05)  # the second: fast
    after = generate_latest(registry).decode()
    both = histogram_quantiles(after, "polymodal:x_seconds", (0.75,))  # both bursts
    assert both["p75"] == pytest.approx(1.0 + 0.5 * 1.5)
    since = histogram_quantiles(after, "polymodal:x_seconds", (0.5, 0.9), since=before)
    assert since["p50"] == pytest.approx(0.05) and since["p90"] == pytest.approx(0.09)
    assert histogram_quantiles(before, "polymodal:x_seconds", since=before) is None  # nothing new
