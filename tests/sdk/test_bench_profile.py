"""The profile's arithmetic over kernel intervals: busy time, marginal cost, idle gaps."""

from polymodal.bench import profile as bench_profile

# (start, end, name) in microseconds: a and b overlap (PDL), then a 5 us gap, c, a 2 us gap, a
SPANS = [(0.0, 10.0, "a"), (8.0, 12.0, "b"), (17.0, 20.0, "c"), (22.0, 23.0, "a")]


def test_busy_marginal_and_gaps(monkeypatch):
    monkeypatch.setattr(bench_profile, "_device_spans", lambda prof, exclude=(): SPANS)
    assert bench_profile._busy_seconds(None) * 1e6 == 12 + 3 + 1
    charged = {r["name"]: r["ms_per_step"] * 1e3 for r in bench_profile._exclusive_ms(None, 1, 9)}
    assert charged == {"a": 11.0, "b": 2.0, "c": 3.0}
    gaps = {r["name"]: r["ms_per_step"] * 1e3 for r in bench_profile._idle_gaps(None, 1, 9)}
    assert gaps == {"b -> c": 5.0, "c -> a": 2.0}
